"""The module map holds: the service does not load training code, the science package knows no HTTP."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def _imports(package: str) -> dict[str, set[str]]:
    """{file: modules it imports (at any depth of the file)} for every module of a package."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


def test_service_does_not_import_training_code():
    bad = {f: sorted(m for m in mods if m.startswith("models.training"))
           for f, mods in _imports("app").items()}
    assert {f: m for f, m in bad.items() if m} == {}


def test_science_package_knows_no_http():
    web = ("fastapi", "starlette", "uvicorn", "httpx", "app")
    bad = {f: sorted(m for m in mods if m.split(".")[0] in web) for f, mods in _imports("models").items()}
    assert {f: m for f, m in bad.items() if m} == {}
    from models.images.imaging import ImageError

    assert not hasattr(ImageError("x", "y"), "status")


def test_functions_stay_readable():
    """No function in app/, models/ or dmfnet/ longer than 80 lines."""
    long = []
    for package in ("app", "models", "dmfnet"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if node.end_lineno - node.lineno + 1 > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert long == []


def test_readme_is_short_and_history_lives_in_the_changelog():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    for doc in ("docs/pacs.md", "docs/training.md", "docs/performance.md", "docs/kubernetes.md", "docs/design.md",
                "docs/service.md"):
        assert doc in readme and (ROOT / doc).exists()  # every moved section is linked


def _project_imports() -> dict[str, set[str]]:
    """{module: project modules it imports, at module level or inside functions}."""
    files = {}
    for package in ("app", "models", "dmfnet"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                while name and name not in files:  # `from models.x import f` -> models.x
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges[module].add(name)
    return edges


def test_no_import_cycles():
    """Each module depends in one direction: no module can reach itself through imports (lazy ones count)."""
    edges = _project_imports()
    cycles = []
    for start in edges:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert cycles == []


# Which of the project's packages each package may import (besides itself and ``models``'s version): the
# module map of README's layout section, checked on every import, lazy ones included.
ALLOWED = {
    "models.nets": set(),
    "models.images": set(),
    "models.inference": {"models.nets", "models.images"},
    "models.volumes": {"models.images", "models.inference", "models.nets"},
    "models.evaluation": {"models.images", "models.inference", "models.nets"},
    "models.training": {"models.images", "models.inference", "models.nets", "models.evaluation"},
    "models.cli": {"models.images", "models.inference", "models.nets", "models.evaluation", "models.volumes",
                   "models.training"},
    # app/: three concerns a request crosses. The engine and pacs/ stand on models/ and the shared logs/settings
    # only; the HTTP layer on the engine; app/cli.py composes them.
    "app.logs": set(),
    "app.settings": {"models.images", "models.inference"},
    "app.engine": {"app.logs", "models.images", "models.inference", "models.nets"},
    "app.pacs": {"app.logs", "models.images", "models.inference", "models.nets", "models.volumes"},
    "app.http": {"app.engine", "app.logs", "app.settings", "models.images", "models.inference", "models.nets"},
    "app": {"app", "models.images", "models.inference", "models.nets", "models.volumes", "models.evaluation"},
    "dmfnet": {"app", "models"},
}


def _package(module: str) -> str:
    """The most specific key of ALLOWED that ``module`` belongs to ("" for the models package itself)."""
    best = ""
    for name in ALLOWED:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def test_packages_import_only_downward():
    """nets/ and images/ stand on nothing of ours; inference/ on those; volumes/ on images/ + inference/;
    models/ never imports app/. A new module or import that breaks the map fails here, naming the arrow."""
    edges = _project_imports()
    bad = []
    for module, targets in edges.items():
        own = _package(module)
        assert own or module == "models", f"{module} is in no package of the map: add it to ALLOWED"
        for target in targets:
            other = _package(target)
            if target == "models" or other == own or any(
                    other == a or other.startswith(a + ".") for a in ALLOWED.get(own, ())):
                continue
            bad.append(f"{module} -> {target}")
    assert bad == []


def test_models_is_a_few_packages_with_small_files():
    """models/ holds packages, not a flat floor: only cli.py and __init__.py beside them; no file over 400 lines;
    every package's first docstring line says what it holds."""
    models = ROOT / "models"
    assert sorted(p.name for p in models.glob("*.py")) == ["__init__.py", "cli.py"]
    for pkg in ("nets", "inference", "images", "volumes", "training", "evaluation"):
        doc = ast.get_docstring(ast.parse((models / pkg / "__init__.py").read_text()))
        assert doc and len(doc) > 40, pkg
    long = [str(p.relative_to(ROOT)) for package in ("app", "models", "dmfnet") for p in (ROOT / package).rglob("*.py")
            if len(p.read_text().splitlines()) > 400]
    assert long == []


def test_python_m_app_cli_still_serves():
    import pytest

    from app.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0


def test_serve_refuses_a_secret_flag_without_printing_it(capsys):

    from dmfnet.cli import main

    for args in (["--api-key", "S3CRET"], ["--api-key=S3CRET"], ["--api-k", "S3CRET"], ["--api-k=S3CRET"]):
        try:
            code = main(["serve", *args])
        except SystemExit as done:
            code = done.code
        err = capsys.readouterr().err
        assert code == 2 and "S3CRET" not in err and "error" in err, (args, err)


def test_benchmarks_and_scripts_stand_on_the_harness_not_on_the_tests():
    """bench/ and scripts/ import nothing from tests/ (what they share with the tests lives in harness/), harness/
    imports nothing from tests/, and the product (app/, models/, dmfnet/) never imports harness/ or tests/."""
    bad = []
    for package, forbidden in (("bench", ("tests",)), ("scripts", ("tests",)), ("harness", ("tests",)),
                               ("app", ("tests", "harness")), ("models", ("tests", "harness")),
                               ("dmfnet", ("tests", "harness"))):
        for f, mods in _imports(package).items():
            bad += [f"{f} -> {m}" for m in mods if m.split(".")[0] in forbidden]
    assert bad == []


def test_the_engine_and_pacs_know_no_http():
    """app/engine/ and app/pacs/ import no web framework (FastAPI, Starlette, uvicorn, h11): the engine takes
    decoded pairs from whoever received them, the PACS commands speak DICOM (their HTTP client, httpx, is
    DICOMweb's transport, not the service's layer)."""
    web = ("fastapi", "starlette", "uvicorn", "h11", "multipart")
    bad = [f"{f} -> {m}" for package in ("app/engine", "app/pacs") for f, mods in _imports(package).items()
           for m in mods if m.split(".")[0] in web]
    assert bad == []


def test_ci_runs_the_readmes_test_command_fast_tier_first():
    """.ci/run runs exactly the README's second command, whose first pytest call is the developer loop."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    ci = (ROOT / ".ci" / "run").read_text().replace("\\\n", "").splitlines()[-1]
    assert " ".join(ci.split()) == " ".join(blocks[1].split())
    assert '-m "not system and not slow"' in blocks[1].split("&&")[2]


def test_every_service_setting_is_documented():
    """Each ServiceSettings field has its DMFNET_ variable in docs/service.md's table (one home for the reference)."""
    from app.settings import ServiceSettings

    doc = (ROOT / "docs" / "service.md").read_text()
    missing = [name for name in ServiceSettings.model_fields if name.upper() not in doc]
    assert missing == []
