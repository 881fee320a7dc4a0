"""The Hub benchmark tools on a machine without a GPU: they say so and exit 2, nothing more."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_e2e_breakdown_without_a_gpu(capsys):
    from benchmarks.hub import e2e_breakdown

    assert e2e_breakdown.main(["--lengths", "4096"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
