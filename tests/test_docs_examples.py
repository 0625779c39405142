"""Every code example of README.md and docs/**/*.md, checked so that none can rot.

- Python blocks are executed: the blocks of one page in order, in one namespace and one working
  directory (a fresh temporary folder, prepared by the page's ``setup``), and the page's results
  are checked where the text makes a claim about them (:data:`EXPECT`).
- Every ``badexpert ...`` command of a ``bash`` block is parsed by the real parser, with every
  flag valid; a block marked ``run`` is also run, command by command, and each must exit 0.

An HTML comment just before a block says more (``<!-- docs-test: run setup=NAME needs=fashion-mnist
-->``, or ``<!-- docs-test: skip REASON -->``); docs/contributing.md lists the forms. The site itself
is built by CI (``python -m sphinx -W -b html docs docs/_build/html``), not here.
"""

from __future__ import annotations

import re
import shlex
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from badexpert.cli import build_parser, main
from badexpert.errors import BadExpertError

from .conftest import FASHION_MNIST, make_blobs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
PYTHON, SHELL = {"python", "py", "python3"}, {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*docs-test:(.*?)-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^\s`]*)")
SETUPS = ("own-model", "fmnist-model", "fmnist-detector")
NEEDS = {"fashion-mnist": (FASHION_MNIST.is_dir(),
                           "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    run: bool = False
    setup: str | None = None
    needs: list[str] = field(default_factory=list)
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_marker(text: str, where: str) -> dict:
    """``run``, ``setup=NAME``, ``needs=WHAT``, or ``skip REASON`` (the reason required)."""
    words = text.split()
    if words and words[0] == "skip":
        if len(words) < 2:
            raise AssertionError(f"{where}: 'skip' needs a reason")
        return {"skip": " ".join(words[1:])}
    out: dict = {"needs": []}
    for word in words:
        key, _, value = word.partition("=")
        if key == "run" and not value:
            out["run"] = True
        elif key == "setup" and value in SETUPS:
            out["setup"] = value
        elif key == "needs" and value in NEEDS:
            out["needs"].append(value)
        else:
            raise AssertionError(f"{where}: unknown docs-test marker {word!r} (run, setup={'|'.join(SETUPS)}, "
                                 f"needs={'|'.join(NEEDS)}, skip REASON)")
    return out


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page (not MyST directives such as ```{include}), each
    with the marker of the comment just before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i, marker = [], 0, None
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line.strip())
        if m:
            marker = parse_marker(m.group(1), f"{page.relative_to(ROOT)}:{i + 1}")
            i += 1
            continue
        f = FENCE.match(line)
        if not f:
            if line.strip():
                marker = None
            i += 1
            continue
        fence, lang = f.group(1), f.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[0] * len(fence))
                    and not lines[j].strip(fence[0]).strip()), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        if not lang.startswith("{"):
            out.append(Block(page, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", **(marker or {})))
        elif marker:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: a docs-test marker before a MyST directive")
        marker, i = None, end + 1
    return out


def commands(code: str) -> list[list[str]]:
    """The ``badexpert`` commands of a shell block: continuation lines joined, comments dropped,
    ``&&`` / ``;`` / ``|`` chains split."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words, cmd = shlex.split(line, comments=True), []
        for w in words + [";"]:
            if w in ("&&", "||", ";", "|"):
                if cmd and cmd[0] == "badexpert":
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


ALL = {page: blocks(page) for page in PAGES}


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- the blocks themselves -------------------------------------------------------------------------
def test_pages_are_found_and_markers_are_used():
    """The extraction sees the README and the site (a renamed folder would silently test nothing),
    and every marked-run block holds something to run."""
    assert ROOT / "README.md" in ALL and ROOT / "docs" / "index.md" in ALL
    assert sum(b.lang in PYTHON for bs in ALL.values() for b in bs) >= 8
    assert sum(len(commands(b.code)) for bs in ALL.values() for b in bs if b.lang in SHELL) >= 30
    for bs in ALL.values():
        for b in bs:
            if b.run:
                assert b.lang in SHELL and commands(b.code), f"{b.where}: 'run' on a block with no badexpert command"
            if b.lang not in PYTHON | SHELL:
                assert b.setup is None and not b.run, f"{b.where}: a marker on a {b.lang or 'plain'} block"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in SHELL and commands(b.code) for b in ALL[p])],
                         ids=_id)
def test_every_command_parses(page):
    parser = build_parser()
    for b in ALL[page]:
        if b.lang not in SHELL:
            continue
        for argv in commands(b.code):
            try:
                parser.parse_args(argv[1:])
            except SystemExit as exc:  # --help, --version
                assert exc.code == 0, f"{b.where}: {shlex.join(argv)} exits {exc.code}"
            except BadExpertError as exc:
                pytest.fail(f"{b.where}: `{shlex.join(argv)}` does not parse: {exc}")


# --- setups ----------------------------------------------------------------------------------------
class _Normalize(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _own_model(root: Path) -> None:
    """A small RGB classifier from "another team", exported to ONNX without its normalisation
    (ImageNet's, declared on the command line), its class names, and a folder of clean images."""
    from PIL import Image

    from badexpert.training import Recipe, train

    classes = ["cat", "dog", "frog", "ship"]
    data = make_blobs(1000, seed=3, size=12, classes=4)
    images = data.images.repeat(1, 3, 1, 1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    model = torch.nn.Sequential(_Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), net)
    train(model, (images[:400], data.labels[:400]),
          Recipe(optimizer="adam", lr=3e-3, epochs=4, batch_size=64, weight_decay=0, augment=False, amp=False), seed=0)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.rand(2, 3, 12, 12),), str(root / "my-model.onnx"), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}})
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i, (img, label) in enumerate(zip(images[400:], data.labels[400:].tolist())):
        folder = root / "my-clean-images" / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def _fmnist_model(root: Path) -> None:
    """`badexpert train` as in Getting started (a Blend backdoor on Fashion-MNIST), at a size a test
    affords: 5,000 training images, 3 epochs, 1,000 reserved and 1,000 calibration images."""
    assert main(["train", "--dataset", "fashion-mnist", "--arch", "cnn", "--attack", "blend", "--poison-rate", "0.05",
                 "--train-size", "5000", "--epochs", "3", "--reserved", "1000", "--calibration", "1000",
                 "--device", "cpu", "--out", str(root / "runs" / "model.safetensors")]) == 0


def _defend(root: Path) -> None:
    """`badexpert defend` as in Getting started, on that model."""
    assert main(["defend", "--model", str(root / "runs" / "model.safetensors"), "--device", "cpu",
                 "--out", str(root / "runs" / "detector.safetensors")]) == 0


BUILD = {"own-model": _own_model, "fmnist-model": _fmnist_model}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each setup built once for the module, then copied into the pages that use it."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            if name == "fmnist-detector":  # the model of fmnist-model, trained once
                shutil.copytree(get("fmnist-model"), root, dirs_exist_ok=True)
                _defend(root)
            else:
                BUILD[name](root)
            made[name] = root
        return made[name]

    return get


#: What each page's text says its examples produce, checked on the page's namespace after it ran.
EXPECT = {
    "README.md": lambda ns: (
        ns["result"].metrics["attack_success_rate"] > 0.9
        and ns["result"].metrics["defense"]["attack_success_rate"] < 0.2
        and bool((~ns["out"].reject).any())),
    "docs/python-api.md": lambda ns: (
        ns["result"].metrics["defense"]["auroc"] > 0.9 and len(ns["scores"]) == 64
        and [d["name"] for d in ns["comparison"].metrics["detectors"]] == ["badexpert", "scale_up"]),
    "docs/own-model.md": lambda ns: float(ns["detector"].predict(ns["s"].test.images).float().mean()) < 0.2,
    "docs/contributing.md": lambda ns: (
        all(v == "ok" or v.startswith("skipped") for v in ns["report"].values())
        and sum(v == "ok" for v in ns["report"].values()) >= 10),
}


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in PYTHON or b.run for b in ALL[p])], ids=_id)
def test_examples_run(page, prepared, tmp_path, monkeypatch):
    todo = [b for b in ALL[page] if (b.lang in PYTHON or b.run)]
    skipped = [b for b in todo if b.skip]
    todo = [b for b in todo if not b.skip]
    if not todo:
        pytest.skip("; ".join(f"{b.where}: {b.skip}" for b in skipped))
    for need in {n for b in todo for n in b.needs}:
        ok, why = NEEDS[need]
        if not ok:
            pytest.skip(why)
    setups = {b.setup for b in todo if b.setup}
    assert len(setups) <= 1, f"{_id(page)}: one setup per page, got {sorted(setups)}"
    if setups:
        shutil.copytree(prepared(setups.pop()), tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for b in todo:
        if b.lang in PYTHON:
            exec(compile(b.code, b.where, "exec"), namespace)  # noqa: S102 - the documentation's own examples
            continue
        for argv in commands(b.code):
            assert argv[1:2] != ["serve"], f"{b.where}: a service cannot run in a test; mark the block otherwise"
            assert main(argv[1:]) == 0, f"{b.where}: `{shlex.join(argv)}` failed"
    check = EXPECT.get(_id(page))
    if check is not None:
        assert check(namespace), f"{_id(page)}: its examples ran but did not give what the page says"


# --- what the pages promise about the code ---------------------------------------------------------
def test_every_registered_method_is_documented():
    """The hand-written tables of attacks.md and detectors.md (family, trigger, weaknesses) name every
    registered method: a new attack or detector without its row fails here."""
    from badexpert.attacks import ATTACKS
    from badexpert.detectors import DETECTORS

    for page, registry in (("attacks.md", ATTACKS), ("detectors.md", DETECTORS)):
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M))
        missing = [n for n in registry if n not in rows and not (page == "detectors.md" and n == "badexpert")]
        assert not missing, f"docs/{page} has no table row for {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    command = next(line for line in reversed(ci) if line.startswith("python -m pytest"))
    readme = [b for b in ALL[ROOT / "README.md"] if b.lang in SHELL]
    assert any(line.split("#")[0].strip() == command for b in readme for line in b.code.splitlines())


def test_version_lives_in_one_place(capsys):
    """pyproject.toml reads the version from ``badexpert.__version__`` (nothing to keep in step), and
    ``badexpert --version`` prints it."""
    tomllib = pytest.importorskip("tomllib")
    import badexpert

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "badexpert.__version__"}
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"badexpert {badexpert.__version__}"
    assert re.search(r"^## \[Unreleased\]$", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), flags=re.M)
