"""docs/config.md is generated from the typed configs: it cannot drift from the code."""

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
