"""The project's promises about itself: layout, README, CI entry point, Dockerfile references."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import build
from clients.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_build_package_is_ours_not_pypa():
    assert Path(build.__file__).resolve().parent == ROOT / "build"


def test_readme_and_ci_promise_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_every_kiln_command_in_the_readme_parses():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                for line in block.splitlines() if line.strip().startswith("kiln ")]
    assert len(commands) >= 8
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])  # raises SystemExit on a bad example


def test_dockerfile_references_exist():
    from build.vit import ViTBuildOptions, vit_model_configs
    from build.imaging import EvalTransform

    dockerfile = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", dockerfile)
    sources = []
    for line in logical.splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources, "the Dockerfile copies nothing?"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    # The Python-backend models import only what the image gets.
    copied_modules = {Path(s).stem for s in sources if s.startswith("build/")}
    for model in ("vit_preprocess", "vit_postprocess"):
        code = (ROOT / "model_repository" / model / "1" / "model.py").read_text()
        for module in re.findall(r"^from build\.(\w+) import", code, re.M):
            assert module in copied_modules, f"{model} imports build.{module}, which the image lacks"
    for requirement in (ROOT / "requirements-serving.txt").read_text().split():
        if not requirement.startswith("#") and "==" in requirement:
            assert requirement.split("==")[0] in ("numpy", "pillow")
    # Models named in the Dockerfile are models the native build writes.
    configs = vit_model_configs(ViTBuildOptions(random_weights=True, triton_backend="native"),
                                EvalTransform(248, (224, 224), "bicubic", (0.5,) * 3, (0.5,) * 3))
    names = {c.name for c in configs}
    for model in re.findall(r"/v2/models/(\w+)/", dockerfile):
        assert model in names
    assert "--model-repository=/models" in dockerfile and "COPY model_repository/ /models/" in dockerfile
    assert "ENV KILN_SITE_PACKAGES=/opt/kiln" in dockerfile
