"""The `diffalign` command line: one flag style (snake_case) across commands, old spellings kept."""

import argparse

from diffalign.cli import build_parser


def _parsers(parser, name="diffalign"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_multi_word_flag_is_snake_case_with_the_old_spelling_as_alias():
    checked = 0
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs:
                continue
            # The first long spelling, what --help and usage show, is snake_case.
            assert "-" not in longs[0][2:], f"{name}: {longs}"
            for opt in longs:
                assert parser._option_string_actions["--" + opt[2:].replace("-", "_")] is action
            checked += len(longs)
    assert checked > 100


def test_old_and_new_spellings_parse_the_same():
    parser = build_parser()
    old = parser.parse_args(["geneval", "generate", "--model", "toy", "--out", "o", "--n-samples", "2",
                             "--guidance-scale=3", "--lora-scale", "0.5"])
    new = parser.parse_args(["geneval", "generate", "--model", "toy", "--out", "o", "--n_samples", "2",
                             "--guidance_scale=3", "--lora_scale", "0.5"])
    assert vars(old) == vars(new) and new.n_samples == 2 and new.guidance_scale == 3.0 and new.lora_scale == 0.5
    assert parser.parse_args(["quickstart", "--with-control"]).with_control
    assert parser.parse_args(["quickstart", "--with_control"]).with_control
    assert parser.parse_args(["demo", "--no-geneval", "--max_loras", "3"]).no_geneval
