"""The command line against the shared live server."""
import subprocess
import sys


def genserve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "genserve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands():
    out = genserve("--help").stdout
    for command in ("serve", "generate", "models", "profile", "simulate", "loadgen"):
        assert command in out
    assert "--num-workers" in genserve("serve", "--help").stdout


def test_generate_and_models(server, tmp_path):
    path = tmp_path / "cat.png"
    done = genserve("generate", "a cat", "--target", server.target, "--steps", "3", "--seed", "5", "-o", str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "64x64" in done.stdout and "SLO" in done.stdout
    models = genserve("models", "--target", server.target)
    assert models.returncode == 0 and "sd3-tiny" in models.stdout and "wan-tiny" in models.stdout


def test_generate_bad_input_exits_nonzero(server):
    done = genserve("generate", "a cat", "--target", server.target, "--width", "30")
    assert done.returncode != 0 and "width" in done.stderr
