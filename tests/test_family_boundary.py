"""Only a model family's package names a family: the generic packages take
everything from the interface (models/family.py)."""

from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "omnitrain"
ALLOWED = ("models", "conf", "assets")


def test_no_generic_file_names_a_family():
    # what `git grep -il qwen -- src/omnitrain ':!models' ':!conf' ':!assets'` checks, untracked files included
    offenders = [
        str(f.relative_to(PKG))
        for f in PKG.rglob("*")
        if f.is_file() and f.relative_to(PKG).parts[0] not in ALLOWED and "__pycache__" not in f.parts
        and "qwen" in f.read_text(errors="ignore").lower()
    ]
    assert offenders == []


def test_every_family_is_registered_and_declares_its_modules():
    from omnitrain.models import family_classes

    for name, cls in family_classes().items():
        mods = [m.name for m in cls.modules]
        assert mods[-1] == "llm" and len(set(mods)) == len(mods), name
        assert cls.hf_class and cls.hf_config_class and cls.hf_model_types and cls.chat, name
        assert (PKG / "models" / name).is_dir(), name
