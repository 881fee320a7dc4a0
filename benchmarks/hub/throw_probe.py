#!/usr/bin/env python3
"""Why does a failing TORCH_CHECK inside an extension op crash the process on some images?

Answer found with it (benchmarks/NOTES.md, "Op errors"): where the compiler that
torch.utils.cpp_extension runs ($CXX) finds libstdc++.a but no shared libstdc++ to link against,
every extension carries its own copy of libstdc++ beside the shared one torch loaded, and that copy
crashes formatting a number into the check's message. hub_kernels/build.py links the shared one.

Builds a minimal torch extension (ops that fail a TORCH_CHECK, throw std::runtime_error, or
return; plus ``extern "C"`` functions that throw and catch inside the library) the way
torch.utils.cpp_extension builds it, relinks/recompiles it with a few toolchain variants, and
calls each piece in a child process (a plain C++ library that formats a number, too). Prints the
toolchain and torch build facts, how each library got the C++ runtime (shared or a static copy),
and where a crash faults (a stack scan preloaded into the child). With --deep: more variants,
which shared objects define the C++ runtime / unwinder entry points, which object each such
symbol binds to (LD_DEBUG=bindings), and a debugger backtrace (gdb or cuda-gdb, where present).

    python benchmarks/hub/throw_probe.py WORK_DIR [--details DIR] [--hub-so BUILD/VARIANT/NS.so]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CPP = r"""
#include <torch/all.h>
#include <torch/library.h>
#include <stdexcept>
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: x must be 99-d, got ", x.sizes());
  return x;
}
at::Tensor probe_plain(const at::Tensor& x) {
  TORCH_CHECK(false, "probe: plain");
  return x;
}
at::Tensor probe_std(const at::Tensor& x) {
  throw std::runtime_error("probe: std");
  return x;
}
at::Tensor probe_ok(const at::Tensor& x) { return x; }
extern "C" int self_catch_std() {
  try { throw std::runtime_error("x"); } catch (const std::exception&) { return 1; }
  return 0;
}
extern "C" int self_catch_c10() {
  try { TORCH_CHECK(false, "x"); } catch (const c10::Error&) { return 1; } catch (...) { return 2; }
  return 0;
}
TORCH_LIBRARY(NS, m) {
  m.def("probe_fail(Tensor x) -> Tensor", &probe_fail);
  m.def("probe_plain(Tensor x) -> Tensor", &probe_plain);
  m.def("probe_std(Tensor x) -> Tensor", &probe_std);
  m.def("probe_ok(Tensor x) -> Tensor", &probe_ok);
}
"""
# No torch at all: does a C++ throw/catch work in this Python process?
PLAIN = r"""
#include <stdexcept>
extern "C" int plain_catch() {
  try { throw std::runtime_error("x"); } catch (const std::exception&) { return 1; }
  return 0;
}
"""

# LD_PRELOAD-ed into a child: on SIGSEGV/SIGABRT, print the faulting pc and the code addresses
# found on the stack (a stack scan, which needs no unwinder), as object+offset and nearest symbol.
SEGV = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
static unsigned long lo[4096], hi[4096], slo, shi; static int nr;
static void maps(unsigned long sp) {
  FILE* f = fopen("/proc/self/maps", "r"); char ln[1024]; nr = 0;
  while (f && fgets(ln, sizeof ln, f)) {
    unsigned long a, b; char perm[8];
    if (sscanf(ln, "%lx-%lx %7s", &a, &b, perm) != 3) continue;
    if (perm[2] == 'x' && nr < 4096) { lo[nr] = a; hi[nr++] = b; }
    if (sp >= a && sp < b) { slo = a; shi = b; }
  }
  if (f) fclose(f);
}
static int code(unsigned long p) { for (int i = 0; i < nr; ++i) if (p >= lo[i] && p < hi[i]) return 1; return 0; }
static void where(const char* tag, unsigned long p) {
  Dl_info i; memset(&i, 0, sizeof i);
  if (dladdr((void*)p, &i) && i.dli_fname) {
    const char* base = strrchr(i.dli_fname, '/') ? strrchr(i.dli_fname, '/') + 1 : i.dli_fname;
    fprintf(stderr, "  %s %s+0x%lx %s+0x%lx\n", tag, base, p - (unsigned long)i.dli_fbase,
            i.dli_sname ? i.dli_sname : "?", i.dli_saddr ? p - (unsigned long)i.dli_saddr : 0);
  }
  else fprintf(stderr, "  %s 0x%lx (no object)\n", tag, p);
}
static void handler(int sig, siginfo_t* si, void* ucv) {
  ucontext_t* uc = (ucontext_t*)ucv;
  unsigned long pc = uc->uc_mcontext.gregs[REG_RIP], sp = uc->uc_mcontext.gregs[REG_RSP];
  fprintf(stderr, "STACKSCAN signal %d fault address %p\n", sig, si->si_addr);
  maps(sp); where("pc", pc);
  int n = 0;
  for (unsigned long* w = (unsigned long*)sp; (unsigned long)(w + 1) <= shi && n < 48; ++w)
    if (code(*w)) { where("stack", *w); ++n; }
  signal(sig, SIG_DFL); raise(sig);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction a; memset(&a, 0, sizeof a); a.sa_sigaction = handler; a.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &a, 0); sigaction(SIGABRT, &a, 0); sigaction(SIGBUS, &a, 0);
}
"""

# No torch either: format a number with std::ostream, as a TORCH_CHECK message does.
FMT = r"""
#include <cstring>
#include <sstream>
extern "C" int fmt(long x, char* out, int n) {
  std::ostringstream s;
  s << "got " << x;
  std::strncpy(out, s.str().c_str(), n);
  return s.good();
}
"""
CHILD_FMT = """
import ctypes, sys
if sys.argv[2] == "torch":
    import torch
lib = ctypes.CDLL(sys.argv[1])
buf = ctypes.create_string_buffer(64)
good = lib.fmt(42, buf, 64)
print("FORMATTED", repr(buf.value.decode()), "good" if good else "stream failed")
"""

CHILD_OP = """
import sys, torch
torch.ops.load_library(sys.argv[1])
ns, op = sys.argv[2], sys.argv[3]
try:
    getattr(getattr(torch.ops, ns), op)(torch.zeros(2))
    print("RETURNED")
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0][:100])
"""
CHILD_HUB = """
import sys, torch
torch.ops.load_library(sys.argv[1])
ops = getattr(torch.ops, sys.argv[2])
q = torch.randn(1, 2, 128, 96, device="cuda", dtype=torch.bfloat16)  # head dim 96: the op rejects it
c = torch.ones(1, 2, 1, dtype=torch.int32, device="cuda")
i = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device="cuda")
try:
    ops.block_sparse_attn_fwd(q, q, q, c, i, 128, 0, 0.1, False, 0)
    print("RETURNED")
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0][:100])
"""
CHILD_CTYPES = """
import ctypes, sys
if sys.argv[3] == "torch":
    import torch
lib = ctypes.CDLL(sys.argv[1])
print("RESULT", getattr(lib, sys.argv[2])())
"""
CHILD_TORCH = """
import torch
try:
    torch.zeros(2).view(3)
except RuntimeError as e:
    print("RAISED:", str(e).splitlines()[0][:100])
"""
CHILD_MAPS = """
import sys, torch
torch.ops.load_library(sys.argv[1])
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if ".so" in l.split()[-1]})
print("\\n".join(libs))
for l in open("/proc/self/status"):
    if l.startswith("x86_"):
        print("#", l.strip())
"""

def _load_build():
    spec = importlib.util.spec_from_file_location("stem_hub_build", Path(__file__).resolve().parents[2] /
                                                  "hub_kernels" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _load_build()  # hub_kernels/build.py: its link flags and its check of the built library
ENTRY_POINTS = ("_Unwind_RaiseException", "_Unwind_Resume", "_Unwind_Find_FDE", "_Unwind_Backtrace",
                "__cxa_throw", "__cxa_allocate_exception", "__cxa_begin_catch", "__gxx_personality_v0",
                "__register_frame_info")


def sh(cmd: str, timeout: int = 60) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    return (r.stdout + r.stderr).strip()


def child(args: list[str], env: dict | None = None, timeout: int = 120, faulthandler: bool = True) -> tuple[int, str]:
    r = subprocess.run([sys.executable, *(["-X", "faulthandler"] if faulthandler else []), *args],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return r.returncode, (r.stdout + r.stderr).strip()


def brief(rc: int, text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"rc {rc}: " + " | ".join(lines[:3])[:300]


def build_flags(root: Path) -> tuple[list[str], list[str], str]:
    """Compile and link flags of torch.utils.cpp_extension for a C++ op library (from the ninja
    file it writes), and the compiler it runs."""
    from torch.utils.cpp_extension import load

    d = root / "ref"
    d.mkdir(parents=True, exist_ok=True)
    (d / "op.cpp").write_text(CPP.replace("NS", "probe_ref"))
    load(name="probe_ref", sources=[str(d / "op.cpp")], build_directory=str(d), is_python_module=False)
    ninja = (d / "build.ninja").read_text()
    var = {m.group(1): m.group(2) for m in re.finditer(r"^(\w+) = (.*)$", ninja, re.M)}
    cflags = [f for f in shlex.split(var["cflags"]) if not f.startswith("-DTORCH_EXTENSION_NAME")]
    return cflags + shlex.split(var.get("post_cflags", "")), shlex.split(var["ldflags"]), var.get("cxx", "c++")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--deep", action="store_true",
                    help="more build variants, LD_DEBUG symbol bindings and a debugger backtrace")
    ap.add_argument("--debugger-timeout", type=int, default=150)
    ap.add_argument("--hub-so", action="append", help="also call a built stem-attention op library with a bad input")
    ap.add_argument("--details", type=Path, default=None, help="write long outputs (LD_DEBUG, backtraces) here")
    args = ap.parse_args()
    root = args.work
    root.mkdir(parents=True, exist_ok=True)
    details = args.details or root
    details.mkdir(parents=True, exist_ok=True)
    import torch

    print("== toolchain and torch")
    print("python", sys.version.split()[0], sys.executable)
    print("torch", torch.__version__, "| cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI,
          "| pybind11", getattr(torch._C, "_PYBIND11_COMPILER_TYPE", None), getattr(torch._C, "_PYBIND11_STDLIB", None),
          getattr(torch._C, "_PYBIND11_BUILD_ABI", None))
    print("torch built with:", [ln.strip() for ln in torch.__config__.show().splitlines()
                                if "GCC" in ln or "C++ Version" in ln or "CXX_FLAGS" in ln][:3])
    print(sh("uname -r; grep PRETTY /etc/os-release; c++ --version | head -1; readlink -f $(which c++); "
             "ld --version | head -1; ldd --version | head -1"))
    tlib = Path(torch.__file__).parent / "lib"
    print(sh(f"for f in libc10.so libtorch_cpu.so libtorch_python.so; do echo $f: "
             f"$(readelf -p .comment {tlib}/$f 2>/dev/null | grep -o 'GCC: [^]]*' | sort -u | head -3 | tr '\\n' ';'); "
             f"done; ldd {tlib}/libtorch_python.so | grep -E 'stdc|gcc_s|unwind'"))

    (root / "fmt.cpp").write_text(FMT)
    cflags, ldflags, cxx = build_flags(root)
    # The compiler cpp_extension runs ($CXX, else c++) and where it finds libstdc++ to link against.
    print(f"cpp_extension compiler: {cxx} (CXX={os.environ.get('CXX')!r}):", sh(f"{cxx} --version | head -1"))
    print(sh(f"for f in libstdc++.so libstdc++.a; do echo $f: $({cxx} -print-file-name=$f); done; "
             "dpkg -l 'libstdc++6' 2>/dev/null | grep ^ii | tr -s ' ' | cut -d' ' -f2,3; "
             f"echo the link of a C++ library that uses std::ostream reads:; "
             f"{cxx} -O1 -fPIC -shared {root / 'fmt.cpp'} -o {root / 'fmt_trace.so'} -Wl,-t 2>&1 | grep stdc"))
    print("cpp_extension compile flags:", " ".join(f for f in cflags if not f.startswith("-isystem")))
    print("cpp_extension link flags:", " ".join(f for f in ldflags if not f.startswith("-L")))

    variants = {  # name -> (extra compile flags, extra link flags)
        "default": ([], []),
        # the C++ runtime linked as the shared object the process already has (hub_kernels/build.py)
        "shared_libstdcxx": ([], BUILD.LINK_FLAGS),
        "static_libstdcxx": ([], ["-static-libstdc++"]),
    }
    if args.deep:
        variants.update({"static_libgcc": ([], ["-static-libgcc"]), "no_cf_protection": (["-fcf-protection=none"], []),
                         "O0": (["-O0"], []), "cxx17": (["-std=c++17"], [])})

    def build(name: str) -> tuple[str, str]:
        cf, lf = variants[name]
        d = root / name
        d.mkdir(exist_ok=True)
        ns = f"probe_{name}"
        (d / "op.cpp").write_text(CPP.replace("NS", ns))
        so = d / f"{ns}.so"
        out = sh(f"{cxx} {' '.join(map(shlex.quote, cflags + cf))} -DTORCH_EXTENSION_NAME={ns} -c {d / 'op.cpp'} "
                 f"-o {d / 'op.o'} && {cxx} {d / 'op.o'} {' '.join(map(shlex.quote, ldflags + lf))} -o {so}",
                 timeout=300)
        if so.exists():
            needed = re.findall(r"\(NEEDED\).*\[(.*)\]", sh(f"readelf -d {so}"))
            print(f"[{name}] C++ runtime: {BUILD.cxx_runtime_linkage(so)}; needs {' '.join(needed)}")
        return name, "" if so.exists() else out[-600:]

    (root / "plain.cpp").write_text(PLAIN)
    fmt_libs = {"fmt_default": [], "fmt_shared": BUILD.LINK_FLAGS, "fmt_static": ["-static-libstdc++"]}
    for name, lf in fmt_libs.items():
        print(sh(f"{cxx} -O1 -fPIC -shared {root / 'fmt.cpp'} -o {root / name}.so {' '.join(lf)}"))
        print(f"[{name}] C++ runtime: {BUILD.cxx_runtime_linkage(root / f'{name}.so')}")
    (root / "stackscan.c").write_text(SEGV)
    plain_so, scan_so = root / "plain.so", root / "stackscan.so"
    with ThreadPoolExecutor(len(variants) + 1) as ex:
        futs = [ex.submit(build, n) for n in variants]
        print(sh(f"{cxx} -O2 -fPIC -shared {root / 'plain.cpp'} -o {plain_so}; "
                 f"cc -O1 -fPIC -shared {root / 'stackscan.c'} -o {scan_so} -ldl"))
        failed = dict(f.result() for f in futs)

    print("== calls (each in a child process)")
    jobs: dict[str, tuple] = {
        "torch's own error": (["-c", CHILD_TORCH],),
        "plain C++ throw/catch, no torch": (["-c", CHILD_CTYPES, str(plain_so), "plain_catch", "-"],),
        "plain C++ throw/catch, torch imported": (["-c", CHILD_CTYPES, str(plain_so), "plain_catch", "torch"],),
    }
    for name in fmt_libs:
        for imp in ("-", "torch"):
            jobs[f"[{name}] format 42, {'torch imported' if imp == 'torch' else 'no torch'}"] = (
                ["-c", CHILD_FMT, str(root / f"{name}.so"), imp],)
    for name in variants:
        if failed[name]:
            print(f"[{name}] build failed: {failed[name]}")
            continue
        ns = f"probe_{name}"
        so = str(root / name / f"{ns}.so")
        for fn in ("self_catch_std", "self_catch_c10"):
            jobs[f"[{name}] {fn} (ctypes)"] = (["-c", CHILD_CTYPES, so, fn, "torch"],)
        for op in ("probe_ok", "probe_fail", "probe_plain", "probe_std"):
            jobs[f"[{name}] {op} (torch.ops)"] = (["-c", CHILD_OP, so, ns, op],)
    so = str(root / "default" / "probe_default.so")
    jobs["[default] probe_fail, TORCH_SHOW_CPP_STACKTRACES=1"] = (["-c", CHILD_OP, so, "probe_default", "probe_fail"],
                                                                   {"TORCH_SHOW_CPP_STACKTRACES": "1"})
    with ThreadPoolExecutor(8) as ex:
        results = dict(zip(jobs, ex.map(lambda a: child(*a), jobs.values())))
    for k, (rc, text) in results.items():
        print(f"{k}: {brief(rc, text)}")
    if all(rc == 0 for rc, _ in results.values()):
        print("every call returned or raised: nothing crashes here")

    print("== where the failing call faults (stack scan of the faulting thread)")
    rc, text = child(["-c", CHILD_OP, so, "probe_default", "probe_fail"], env={"LD_PRELOAD": str(scan_so)},
                     faulthandler=False)
    print(f"rc {rc}\n" + "\n".join(ln for ln in text.splitlines()[:60]))

    for hub in args.hub_so or []:
        ns = Path(hub).stem
        print(f"stem-attention op {ns}, bad head dim:", brief(*child(["-c", CHILD_HUB, hub, ns])))
        rc, text = child(["-c", CHILD_HUB, hub, ns], env={"LD_PRELOAD": str(scan_so)}, faulthandler=False)
        print(f"  with the stack scan: rc {rc}\n" + "\n".join(text.splitlines()[:40]))

    if not args.deep:
        return 0
    print("== shared objects and the C++ runtime entry points they define")
    rc, maps = child(["-c", CHILD_MAPS, so])
    libs = [ln for ln in maps.splitlines() if ln.startswith("/")]
    print(f"{len(libs)} objects mapped;", " ".join(ln for ln in maps.splitlines() if ln.startswith("#")))
    for lib in libs:
        if re.search(r"stdc\+\+|gcc_s|unwind|libc\.so|libpython", lib):
            print("  mapped:", lib)
    for lib in libs:
        syms = sh(f"nm -D --defined-only {shlex.quote(lib)} 2>/dev/null | grep -wE '{'|'.join(ENTRY_POINTS)}'")
        if syms:
            print(f"  {lib} defines: {' '.join(sorted({ln.split()[-1] for ln in syms.splitlines()}))}")
    print(sh(f"ldd {so} | grep -E 'stdc|gcc_s|unwind'; readelf -d {so} | grep -E 'NEEDED|RPATH|RUNPATH'"))

    print("== symbol bindings of the failing call (LD_DEBUG=bindings): symbol -> defining object")
    child(["-c", CHILD_OP, so, "probe_default", "probe_fail"],
          env={"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(details / "ld_debug")}, timeout=300)
    pairs: dict[str, set] = {}
    keep = []
    for f in sorted(details.glob("ld_debug*")):
        for ln in f.read_text(errors="replace").splitlines():
            m = re.search(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: \w+ symbol `([^']+)'", ln)
            if not m:
                continue
            if m.group(3) in ENTRY_POINTS:
                pairs.setdefault(m.group(3), set()).add(m.group(2))
            if "probe_default" in m.group(1) and "probe_default" not in m.group(2) and re.search(
                    r"Error|Unwind|cxa|gxx|_ZTI|_ZTV|Warning|torchCheck|str_wrapper", m.group(3)):
                keep.append(f"{m.group(3)} -> {m.group(2)}")
        f.unlink()
    for sym, objs in pairs.items():
        print(f"  {sym}: {sorted(objs)}")
    print("  the probe's own bindings:\n    " + "\n    ".join(sorted(set(keep))[:30]))

    print("== debugger backtrace of the failing call")
    dbg_tool = shutil.which("gdb") or shutil.which("cuda-gdb")
    if dbg_tool:
        script = root / "child_op.py"
        script.write_text(CHILD_OP)
        try:
            bt = sh(f"{dbg_tool} -batch -ex 'set pagination off' -ex run -ex bt -ex 'x/6i $pc' "
                    f"--args {sys.executable} {script} {so} probe_default probe_fail", timeout=args.debugger_timeout)
        except subprocess.TimeoutExpired:
            bt = "debugger timed out"
        (details / "backtrace.txt").write_text(bt + "\n")
        keep = [ln for ln in bt.splitlines() if re.match(r"#\d+|Thread .* received|Program received|=>|\[Inferior", ln)]
        print(f"({dbg_tool})\n" + "\n".join(keep[:40]))
    else:
        print("no gdb / cuda-gdb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
