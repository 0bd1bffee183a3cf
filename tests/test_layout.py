"""The project's promises about itself: the layout's rules, lint, the README, the CI entry point, the Dockerfile."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import build
from build.repository import RUNTIME_MODEL
from kiln.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OURS = ("kiln", "build", "orchestrator", "clients", "benchmarks", "tests")


def test_build_package_is_ours_not_pypa():
    assert Path(build.__file__).resolve().parent == ROOT / "build"


def test_import_contracts_hold():
    """The layout's arrows (pyproject.toml's contracts): a new import that breaks one fails here."""
    result = subprocess.run([str(BIN / "lint-imports")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([str(BIN / "ruff"), "check", "."], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]


def _our_imports(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return {m for m in modules if m.split(".")[0] in OURS}


def test_triton_models_import_only_kiln():
    """Hand-written models and the template the build writes the others from reach nothing of ours but kiln."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in ROOT.glob("model_repository/*/1/model.py")}
    sources["build/repository.py:RUNTIME_MODEL"] = RUNTIME_MODEL.format(name="sd_unet")
    assert len(sources) >= 7
    for name, code in sources.items():
        imports = _our_imports(code)
        assert imports and all(m.split(".")[0] == "kiln" for m in imports), (name, imports)


def test_no_model_name_is_written_outside_the_contract():
    """Model names live in kiln/contract.py; product code refers to them, never spells them."""
    # Every name but the bare "vit", which also names the ViT's report section and benchmark.
    names = re.findall(r'^(?:VIT|SD)_\w+ = "(\w+)"', (ROOT / "kiln" / "contract.py").read_text(), re.M)
    assert len(names) >= 15
    pattern = re.compile(r'["\'/](' + "|".join(sorted(names, key=len, reverse=True)) + r')["\'/]')
    offenders = []
    for folder in ("kiln", "build", "orchestrator", "clients", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "contract.py" and path.parent.name == "kiln":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if pattern.search(code) and '"""' not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_module_is_a_hub():
    """Past ~400 lines a module usually holds two jobs (STYLE.md)."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("kiln", "build", "orchestrator", "clients", "benchmarks")
             for p in (ROOT / folder).rglob("*.py")}
    assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_readme_and_ci_promise_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
            for line in block.splitlines() if line.strip().startswith("kiln ")]


def test_every_kiln_command_in_the_readme_parses():
    commands = readme_commands()
    assert len(commands) >= 8
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])  # raises SystemExit on a bad example


def test_readme_layout_names_every_package():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    for package in ("kiln/", "cli/", "runtime/", "pipeline/", "server/", "vit/", "sd/", "clients/", "build/"):
        assert package in layout, package


def test_dockerfile_references_exist():
    """What the Dockerfile copies from the source tree exists; the repository comes from REPO, never the source
    tree's model folders (tests/test_image.py assembles and checks the image's content)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", dockerfile)
    sources = []
    for line in logical.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert "kiln/" in sources and "${REPO}/" in sources and "model_repository/" not in sources
    for source in sources:
        if "${REPO}" not in source:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "--model-repository=/models" in dockerfile and "ENV KILN_SITE_PACKAGES=/opt/kiln" in dockerfile
    assert "python3 -m kiln.repository /models" in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert "docker run" in readme and "--shm-size" in readme.split("docker run", 1)[1].splitlines()[0]
