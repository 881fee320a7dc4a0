/* Found before the C library's own <sys/single_threaded.h> (build.py puts this directory first on
 * the include path). glibc 2.32 added `char __libc_single_threaded`, and libstdc++ (GCC 11+) reads it
 * wherever <sys/single_threaded.h> exists, to skip atomic reference counting in single-threaded
 * processes. A library built that way needs GLIBC_2.32 and is no manylinux_2_28 library (older
 * glibc, e.g. the manylinux_2_28 baseline that torch wheels target, has no such symbol). Here the
 * flag reads as constant "not single-threaded": libstdc++ takes the path it takes with glibc < 2.32
 * (atomic reference counts, always correct), and the library references no GLIBC_2.32 symbol. */
#ifndef STEM_COMPAT_SYS_SINGLE_THREADED_H
#define STEM_COMPAT_SYS_SINGLE_THREADED_H
static const char stem_compat_libc_single_threaded = 0;
#define __libc_single_threaded stem_compat_libc_single_threaded
#endif
