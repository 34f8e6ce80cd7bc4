"""The docs: docs/config.md is generated from the typed configs (it cannot drift from the code), and every
`grlm` command the README shows parses and loads its config."""

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_the_generated_one():
    from grlm_ray.core.configdoc import reference

    assert DOC.read_text() == reference(), "docs/config.md is stale: python -m grlm_ray.core.configdoc > docs/config.md"


def test_config_reference_names_every_field_of_every_section():
    from pydantic import BaseModel

    from grlm_ray.core.config import GrlmConfig
    from grlm_ray.core.configdoc import reference

    text = reference()
    for section, field in GrlmConfig.model_fields.items():
        assert f"## `{section}` ({field.annotation.__name__})" in text
        assert issubclass(field.annotation, BaseModel)
        for name in field.annotation.model_fields:
            assert f"| `{name}` |" in text, f"{section}.{name}"


def test_field_notes_take_comments_beside_and_above_a_field():
    from grlm_ray.core.configdoc import field_notes

    class Example:
        # above a, first line
        # above a, second line
        a: int = 1  # beside a
                    # continues a (further right)
        b: str = "x"

        def method(self) -> None:  # not a field
            pass

    notes = field_notes(Example)
    assert notes["a"] == "above a, first line above a, second line beside a continues a (further right)"
    assert "b" not in notes and "method" not in notes


def _grlm_commands(path: Path) -> list[str]:
    """Every `grlm ...` command inside the code blocks of a Markdown file (a trailing `# comment` cut; lines
    continued with a backslash joined)."""
    out, inside, lines = [], False, iter(path.read_text().splitlines())
    for line in lines:
        if line.strip().startswith("```"):
            inside = not inside
            continue
        text = line.strip()
        while text.endswith("\\"):
            text = text[:-1] + " " + next(lines).strip()
        if inside and (text.startswith(".venv/bin/grlm ") or text.startswith("grlm ")):
            out.append(text.split(" #")[0].strip())
    return out


def test_every_grlm_command_in_the_readme_parses_and_its_config_loads():
    """The README's commands are what a user types: each verb exists, its arguments parse, and a config it
    names loads with its overrides (a key the configs do not have, or a value of the wrong type, fails)."""
    import shlex

    from grlm_ray.cli import build_parser
    from grlm_ray.core.config import load_config

    root = DOC.parents[1]
    commands = _grlm_commands(root / "README.md")
    assert len(commands) >= 25
    parser = build_parser()
    named = set()
    for command in commands:
        argv = shlex.split(command)[1:]
        args = parser.parse_args(argv)
        configs = [a for a in argv if a.startswith("configs/") and a.endswith(".yaml")]
        if configs:
            named.add(configs[0])
            overrides, take = [], True  # key=value after the config, or after --set (not another option's values)
            for a in argv[argv.index(configs[0]) + 1:]:
                if a.startswith("--"):
                    take = a == "--set"
                elif take and "=" in a:
                    overrides.append(a)
            load_config(root / configs[0], overrides)
        elif args.verb == "demo":
            load_config(root / "configs" / "demo.yaml", [a for a in argv if "=" in a])
    assert {"configs/byo_recipe.yaml", "configs/bench/beauty_quality.yaml", "configs/demo.yaml"} <= named


def test_result_files_record_no_machine_paths(tmp_path):
    """Benchmark results are committed: paths in the checkout become repo-relative, the shared data folder
    ``../shared/...``, any other machine path ``<local>/<last part>``; routes and URLs stay as they are. Every
    committed result file is already that way."""
    import json

    from grlm_ray.bench.common import portable, write_result

    repo = DOC.parents[1]
    out = write_result("x", {"plot": f"{repo}/benchmarks/results/x.png", "cmd": f"grlm eval c.yaml "
                             f"data.base_dir={repo.parent}/shared/data run.root=/tmp/exp3/runs",
                             "route": "POST /v1/admin/items", "url": "http://127.0.0.1:8000/v1/recommend"}, tmp_path)
    got = json.loads(out.read_text())
    assert got["plot"] == "benchmarks/results/x.png"
    assert got["cmd"] == "grlm eval c.yaml data.base_dir=../shared/data run.root=<local>/runs"
    assert got["route"] == "POST /v1/admin/items" and got["url"] == "http://127.0.0.1:8000/v1/recommend"
    for f in sorted((repo / "benchmarks" / "results").glob("*.json")):
        data = json.loads(f.read_text())
        assert portable(data, repo) == data, f"{f.name} records a machine path"
