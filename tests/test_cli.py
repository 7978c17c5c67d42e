import subprocess
import sys

from typer.testing import CliRunner

from tmkt import __version__
from tmkt.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"tmkt {__version__}"


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "data" in result.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "tmkt", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
