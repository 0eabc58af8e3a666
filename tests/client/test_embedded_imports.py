"""An embedded load imports nothing of the daemon client: no HTTP stack in a worker that reads files itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch


def test_an_embedded_load_imports_no_http_stack(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, path)
    script = textwrap.dedent(
        """
        import sys
        import ckptd
        assert ckptd.load(sys.argv[1])["w"].sum().item() == 2.0
        print(sorted(name for name in ("httpx", "httpcore", "h11", "ckptd._client") if name in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
