"""The repository's promises about itself: CI runs the README's test command, configs load."""

import re
from pathlib import Path

import pytest

from dreambooth_dora.training.config import load_config

REPO = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (REPO / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci_lines = [l for l in (REPO / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci_lines[-1] == commands[1]  # the README's test command, last, verbatim
    assert "pytest" in commands[1] and "train_dreambooth_dora.py" in commands[0]


@pytest.mark.parametrize("path", sorted((REPO / "train_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(["--config", str(path)])
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch") and f"--config train_configs/{path.name}" in first
    assert Path(cfg.instance_data_dir).is_dir()


@pytest.mark.parametrize("dora_path", sorted((REPO / "train_configs").glob("*_dora.yaml")), ids=lambda p: p.name)
def test_every_dora_recipe_has_a_lora_twin_differing_only_in_use_dora(dora_path):
    import yaml

    lora_path = dora_path.with_name(dora_path.name.replace("_dora.yaml", "_lora.yaml"))
    dora, lora = yaml.safe_load(dora_path.read_text()), yaml.safe_load(lora_path.read_text())
    assert dora.pop("use_dora") is True and lora.pop("use_dora") is False
    assert dora.pop("output_dir") != lora.pop("output_dir")
    assert dora == lora


@pytest.mark.parametrize("path", sorted((REPO / "train_configs" / "evaluate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_evaluation_config_loads_and_starts_with_its_command(path, monkeypatch):
    from dreambooth_dora.evaluation import load_eval_config

    monkeypatch.chdir(REPO)
    cfg = load_eval_config(["--config", str(path)])
    assert path.read_text().splitlines()[0] == f"# dreambooth-dora evaluate --config train_configs/evaluate/{path.name}"
    assert Path(cfg.instance_data_dir).is_dir() and len(cfg.adapters) >= 2 and cfg.class_prompts and cfg.unrelated_prompts


def import_graph() -> dict[str, set[str]]:
    """Every import between the project's modules (top-level and inside functions): module -> modules."""
    import ast

    mods = {}
    for path in [*(REPO / "dreambooth_dora").rglob("*.py"), *(REPO / "app").rglob("*.py")]:
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mods[name] = (path, rel.name == "__init__")
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycles():
    """Data flows one way: no module imports (even lazily) one that imports it back."""
    graph, cycles = import_graph(), []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node], done)
        done.add(node)

    done = set()
    for node in sorted(graph):
        visit(node, [], done)
    assert not cycles, cycles
    # the app reaches the library through its public modules; nothing in the library knows the app or the CLI
    assert not any(m.startswith("app") or m == "dreambooth_dora.cli" for src, deps in graph.items()
                   if src.startswith("dreambooth_dora") and src != "dreambooth_dora.cli" for m in deps)
    # the rooms stack too: families below adapters below training, formats and evaluation, the study
    # above both (toy/ stands apart: its pretraining borrows the judge's embedder)
    rooms = {}
    for src, deps in graph.items():
        for dep in deps:
            a, b = (m.split(".")[1] if m.count(".") else m for m in (src, dep))
            if a != b and "toy" not in (a, b):
                rooms.setdefault(a, set()).add(b)
    order = ["families", "adapters", "outputs", "training", "formats", "evaluation", "study", "dreambooth_dora", "cli"]
    upward = [(a, b) for a, deps in rooms.items() for b in deps
              if a in order and b in order and order.index(b) > order.index(a) and b != "outputs" and a != "outputs"]
    assert not upward, upward
    # the config stays light: no torch-importing module behind it at import time
    assert "dreambooth_dora.adapters.inject" not in graph["dreambooth_dora.training.config"]



MAX_FUNCTION_LINES = 120


def test_no_function_is_longer_than_a_screenful_or_two():
    """Every function of the package and the app fits in ~120 lines (the loop reads as set-up plus
    one step; the page as one builder per section)."""
    import ast

    long = []
    for path in [*(REPO / "dreambooth_dora").rglob("*.py"), *(REPO / "app").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_package_shows_its_wings():
    """The rooms the README's layout section names exist, and no module is left on the ground floor
    except the entry points and the shared output writer."""
    package = REPO / "dreambooth_dora"
    for room in ("adapters", "training", "formats", "families", "evaluation", "toy"):
        assert (package / room / "__init__.py").is_file(), room
    ground = sorted(p.name for p in package.glob("*.py"))
    assert ground == ["__init__.py", "cli.py", "outputs.py", "study.py"], ground
    readme = (REPO / "README.md").read_text()
    for room in ("adapters/", "training/", "formats/", "families/", "evaluation/", "study.py"):
        assert room in readme, room


def test_model_cards_written_before_the_move_still_run():
    """Adapters trained before the package moved carry model cards importing the old module paths."""
    import subprocess
    import sys

    code = ("from dreambooth_dora.pivotal import insert_tokens\nfrom dreambooth_dora.models import resolve_model\n"
            "from dreambooth_dora import load_adapter, insert_tokens as new\n"
            "assert insert_tokens is new and insert_tokens('a TOK', {'TOK': ['<s0>']}) == 'a <s0>'\n"
            "assert resolve_model('embedded:toy-world').endswith('toy-world')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
