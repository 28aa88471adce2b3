"""The README's demo and the benchmark script run end to end."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs(capsys):
    from curvops import demo

    demo.main()
    out = capsys.readouterr().out
    assert "KFAC vs exact GGN: relative Frobenius error" in out
    difference = re.search(r"textbook .*: max difference (\S+)", out).group(1)
    assert float(difference) < 1e-12
    assert "matrix-free CG vs dense eigendecomposition: relative difference" in out


def _quick(script, *options):
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *options]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout


def test_kronecker_benchmark_quick_mode_runs():
    out = _quick("kronecker.py")
    assert "inv-matvec" in out and out.count("x)") >= 12


def test_exact_benchmark_quick_mode_runs():
    out = _quick("exact.py")
    assert "GGN @ V (16 columns)" in out and out.count("x)") >= 10


def test_readme_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## A taste\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    x = namespace["torch"].randn(660, dtype=namespace["torch"].float64)
    assert namespace["torch"].allclose(namespace["same"] @ x, namespace["model"] @ x)


def test_readme_training_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Training with natural gradient\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["opt"].steps == 20


def test_influence_low_rank_benchmark_quick_mode_runs():
    out = _quick("influence_low_rank.py")
    assert "top-10 overlap" in out and "exact" in out


def test_laplace_last_layer_benchmark_quick_mode_runs():
    out = _quick("laplace_last_layer.py")
    assert "speed-up" in out and "kfac" in out


def test_kfac_benchmark_quick_mode_runs():
    out = _quick("kfac.py", "--workloads", "tokens")
    assert "statistics (factors)" in out and "tokens: D =" in out and out.count("x)") >= 5


def test_ekfac_benchmark_quick_mode_runs():
    out = _quick("ekfac.py", "--workloads", "tokens")
    assert "corrections (auto)" in out and "TEKFAC" in out


def test_optimizer_benchmark_quick_mode_runs():
    out = _quick("optim.py", "--workloads", "tokens")
    assert "KFAC T_stats=10" in out and "zeroth-order" in out and "x)" in out


def test_transformer_benchmark_quick_mode_runs():
    out = _quick("transformer.py")
    assert "GPT: 2 layers" in out and "EKFAC" in out and out.count("x; forward+backward") == 3


def test_peers_benchmark_quick_mode_runs():
    """Runs with or without curvlinops (the optional [bench] extra); the floor is printed either way."""
    out = _quick("peers.py", "--workloads", "tokens")
    assert "floor of the statistics pass" in out and "KFAC build" in out and "GGN @ v" in out
    assert out.count("x ") >= 6


def test_peers_benchmark_saves_and_compares_products(tmp_path):
    saved = tmp_path / "before.pt"
    _quick("peers.py", "--workloads", "tokens", "--save", str(saved))
    out = _quick("peers.py", "--workloads", "tokens", "--compare", str(saved))
    differences = [float(x) for x in re.findall(r"tokens/\S+\s+(\S+)", out)]
    assert len(differences) == 4 and max(differences) == 0.0
