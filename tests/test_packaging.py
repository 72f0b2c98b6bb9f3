"""What packaging and CI rely on in the repository's files: the README's first commands (CI runs the test command
it reads from there), the licence file that pyproject.toml names, py.typed, and an API reference page for every
module. The build itself (sdist, wheel, a fresh environment) is checked by .ci/package-smoke in CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_bash_block(text: str) -> list[str]:
    match = re.search(r"^```bash\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "the README has no ```bash block"
    return match.group(1).splitlines()


def test_readme_starts_with_the_two_commands_ci_runs():
    """.ci/run takes the test command as the 3rd line of the README's first ```bash block (fence included)."""
    assert _first_bash_block((ROOT / "README.md").read_text()) == [
        'pip install -e ".[quickstart]" && vqtok quickstart',
        'pip install -e ".[dev]" && python -m pytest -q',
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n '/^```bash$/,/^```$/p' README.md | sed -n 3p" in ci


def test_the_licence_file_is_the_one_pyproject_names():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, flags=re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, flags=re.MULTILINE)
    licence = (ROOT / "LICENSE").read_text()
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence and "END OF TERMS" in licence


def test_the_wheel_declares_py_typed():
    assert (ROOT / "vqtok" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^\[tool\.setuptools\.package-data\]\nvqtok = \["py\.typed"\]', pyproject, flags=re.MULTILINE)


def test_every_module_has_an_api_reference_page():
    """A module added to the package without a `::: module` line in docs/api/ would be missing from the docs."""
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.MULTILINE))
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "vqtok").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py", "version.py")}
    assert sorted(modules - documented) == []
    assert sorted(documented - modules) == []  # and no page names a module that is gone
