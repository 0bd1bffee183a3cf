"""Every example in the README is also a test: its Python blocks run as written, and its `kiln` command lines
run too, but for those that take minutes or need what only a user has (each skipped line says why).

The command lines run in a scratch folder (with the project's assets/ beside them) against the session's
Triton and an API service on it. Only the addresses differ from what the README says, and the
generations run 4 steps instead of their 20 (the steps change nothing else a command does).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from kiln.triton_server import free_port
from tests.test_layout import readme_commands

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Lines that are not run, by their first words, and why.
NOT_RUN = {
    "kiln weights vit --random out/vit-random": "writes the full-size ViT: tests/test_cli.py writes and builds it",
    "kiln weights sd --tiny out/sd-tiny --single-file": "tests/test_sd_single_file.py writes and builds it",
    "kiln build vit": "builds every ViT variant (a minute) or needs a user's weights: tests/test_build_vit.py",
    "kiln build sd": "a build: tests/test_sd_single_file.py and the session's repository run the same code",
    "kiln finetune vit --data ./photos": "downloads ViT-B/16's pretrained weights: tests/test_finetune.py runs a "
                                         "ViT-B/16 from local weights",
    "kiln serve": "runs until stopped: tests/test_cli.py starts and stops it",
    'kiln generate "a photo of a cat" --checkpoint': "needs the second checkpoint built beside the session's: "
                                                     "tests/test_checkpoints.py runs it",
    'kiln generate "turn it into a watercolour" --checkpoint': "needs the instruct-pix2pix checkpoint built beside "
                                                               "the session's: tests/test_instruct_pix2pix.py runs "
                                                               "kiln generate --image-cfg-scale on its own Triton",
    "kiln bench": "minutes of measuring: tests/test_sd_variants.py runs the tiny benchmarks",
}


def _skip_reason(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start + " ") or command == start), None)


@pytest.fixture
def api(triton):
    from orchestrator.server.service import BackgroundAPI
    from orchestrator.server.settings import Settings

    live = BackgroundAPI(Settings(triton_url=triton.grpc_url, port=free_port()))
    yield live
    live.stop()


def test_readme_command_lines_run(triton, api, tmp_path, kiln, monkeypatch):
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    photo = Image.open(ROOT / "assets" / "images" / "chelsea.jpg").convert("RGB")
    photo.save(tmp_path / "photo.jpg")
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (photo.width // 3, photo.height // 3, photo.width // 2, photo.height // 2))
    mask.save(tmp_path / "mask.png")
    Image.new("RGB", (128, 128), "black").save(tmp_path / "edges.png")
    monkeypatch.chdir(tmp_path)
    ran, skipped = [], []
    for command in readme_commands():
        reason = _skip_reason(command)
        if reason is not None:
            skipped.append(command)
            continue
        args = shlex.split(command.replace("127.0.0.1:8000", triton.http_url)
                           .replace("http://127.0.0.1:7860", api.url))[1:]
        if args[0] == "build" and "--repo" not in args:  # never the project's own model_repository
            args += ["--repo", str(tmp_path / "model_repository")]
        if args[0] in ("classify", "embed", "generate") and "--url" not in args and "--api" not in args:
            args += ["--url", triton.grpc_url]
        if args[0] == "generate":
            args = [a for i, a in enumerate(args) if a != "--steps" and (i == 0 or args[i - 1] != "--steps")]
            args += ["--steps", "4"]
        code, out, err = kiln(*args)
        assert code == 0, f"{command}\n{out}\n{err}"
        ran.append(command)
    assert len(ran) >= 10 and skipped, (ran, skipped)
    for made in ("cat.png", "cat2.png", "tea.png", "dog.png", "dog2.png", "cup.png", "out.png",
                 "out/sd-tiny/model_index.json", "out/features", "out/my-vit/config.json"):
        assert (tmp_path / made).exists(), made
    assert Image.open(tmp_path / "dog2.png").size == photo.size  # "only masked" keeps the picture's size


def test_readme_python_blocks_run(triton, model_repo, capsys, monkeypatch):
    """Each Python example, as written, against the live server (only the URL and the repository differ)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(ROOT)
    for snippet in blocks:
        snippet = snippet.replace('"127.0.0.1:8001"', repr(triton.grpc_url))
        snippet = snippet.replace('"model_repository"', repr(str(model_repo)))
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
        assert capsys.readouterr().out.strip(), snippet
