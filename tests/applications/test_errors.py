"""Error messages that name the command-line option rather than the setting's field."""

from __future__ import annotations

from applications.errors import UserError, with_option_names

OPTIONS = {"num_threads": "--threads", "lam": "--lam", "seed": "--train-seed"}


def test_leading_setting_name_becomes_the_option():
    err = with_option_names(ValueError("num_threads must be >= 1; got 0"), OPTIONS)
    assert isinstance(err, UserError)
    assert str(err) == "--threads must be >= 1; got 0"
    err = with_option_names(ValueError("lam['1'] must be finite; got nan"), OPTIONS)
    assert str(err) == "--lam['1'] must be finite; got nan"


def test_other_messages_are_kept():
    for text in ("unknown model 'x'; choose one of mlp", "seeds must differ", "seed", ""):
        assert str(with_option_names(ValueError(text), OPTIONS)) == text
