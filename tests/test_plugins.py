from __future__ import annotations

import pytest

from kedit import hookimpl
from kedit.api import Editor, Options, Regularizer
from kedit.errors import InputError, KeditError
from kedit.options import parse_reg, validate
from kedit.plugins import lookup, plugin_listing, register_plugin, registry, unregister_plugin


class _Dup(Editor):
    name = "ft"

    def edit(self, model, tokenizer, specs, options, context):
        return {}


class _DupPlugin:
    @staticmethod
    @hookimpl
    def register_editors(register):
        register(_Dup)


def test_builtins_are_registered_through_entry_points():
    names = {p["name"]: p for p in plugin_listing()}
    assert names["ft"]["package"] == "kedit"
    assert names["ft"]["registers"] == {"editors": ["ft"]}
    assert "register_editors" in names["ft"]["hooks"]
    assert {"gpt2", "llama", "mistral", "qwen2", "gptj", "gpt_neox"} <= set(registry("architectures"))


def test_duplicate_names_are_refused_naming_both_packages():
    register_plugin(_DupPlugin, name="dup", package="kedit-dup", version="9")
    try:
        with pytest.raises(KeditError, match=r"'ft' \(package kedit\) and 'dup' \(package kedit-dup\)"):
            registry("editors")
    finally:
        unregister_plugin("dup")
    assert registry("editors")["ft"].package == "kedit"


def test_unknown_names_list_what_exists():
    with pytest.raises(InputError, match=r"unknown editor 'memitt'; available: .*ft"):
        lookup("editors", "memitt")
    with pytest.raises(InputError, match=r"unknown regularizer 'rec'; available: rect"):
        lookup("regularizers", "rec")


class _Opts(Options):
    k: float = 0.4
    steps: int = 3


@pytest.mark.parametrize("text, expected", [
    ("rect", ("rect", {})),
    ("rect:0.4", ("rect", 0.4)),
    ("rect:k=0.25,eps=1e-6", ("rect", {"k": 0.25, "eps": 1e-6})),
])
def test_reg_shorthand(text, expected):
    assert parse_reg(text) == expected


@pytest.mark.parametrize("text", ["", ":0.4", "rect:", "rect:k=", "rect:k=1,eps", "rect:=3"])
def test_malformed_reg(text):
    with pytest.raises(InputError, match="malformed --reg"):
        parse_reg(text)


def test_option_validation_messages():
    assert validate("editor", "x", _Opts, {"steps": 5}).steps == 5
    with pytest.raises(InputError, match=r"bad value '5' for option 'steps'.*without quotes"):
        validate("editor", "x", _Opts, {"steps": "5"})  # strict: a string is not a number
    with pytest.raises(InputError, match=r"unknown option 'stepz' for editor 'x'; options: k, steps"):
        validate("editor", "x", _Opts, {"stepz": 1})
    with pytest.raises(InputError, match=r"bad value 'many' for option 'steps' of editor 'x'"):
        validate("editor", "x", _Opts, {"steps": "many"})


class _NoApply(Regularizer):
    name = "noapply"  # never implements apply


class _NotAnEditor:
    name = "plain"

    def edit(self, *args):
        return {}


@pytest.mark.parametrize("kind, obj, message", [
    ("regularizers", _NoApply, "not a concrete kedit.api.Regularizer subclass"),
    ("editors", _NotAnEditor, "not a concrete kedit.api.Editor subclass"),
    ("editors", type("Nameless", (_Dup,), {"name": ""}), "not a concrete kedit.api.Editor subclass with a name"),
])
def test_registrations_that_break_the_contract_are_refused_naming_the_package(kind, obj, message):
    class Bad:
        pass

    def hook(register):
        register(obj)

    setattr(Bad, f"register_{kind}", staticmethod(hookimpl(hook)))
    register_plugin(Bad, name="bad", package="kedit-bad", version="1")
    try:
        with pytest.raises(KeditError, match=rf"plugin 'bad' \(package kedit-bad\) registered .*{message}"):
            registry(kind)
    finally:
        unregister_plugin("bad")
    registry(kind)  # and the registry works again once it is gone
