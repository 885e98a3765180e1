"""Tests for merit_lab.envelope: the header, what is refused and how, on hand-written documents."""

from __future__ import annotations

import json
import re

import pytest

from merit_lab.envelope import EnvelopeError, load_enveloped, save_enveloped, unwrap, wrap


def test_wrap_puts_the_header_first_and_keeps_the_payload():
    doc = wrap("merit-lab/thing", 3, {"b": [1, 2], "a": {"x": None}})
    assert list(doc) == ["format", "version", "b", "a"]
    assert doc == {"format": "merit-lab/thing", "version": 3, "b": [1, 2], "a": {"x": None}}


def test_wrap_refuses_a_payload_that_uses_the_header_keys():
    with pytest.raises(
        ValueError, match=r"merit-lab/thing uses the envelope's own keys \['version'\]"
    ):
        wrap("merit-lab/thing", 1, {"version": 7})


def test_unwrap_reads_every_version_up_to_its_own():
    for v in (1, 2, 3):
        assert unwrap({"format": "merit-lab/t", "version": v, "n": v}, "merit-lab/t", 3) == {"n": v}


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        # another format: named, with what the file holds
        ({"format": "merit-lab/other", "version": 1}, "holds 'merit-lab/other', not 'merit-lab/t'"),
        # a newer version than this code reads (2 > 1)
        (
            {"format": "merit-lab/t", "version": 2},
            r"merit-lab/t version 2 is not one .* \(1 to 1\)",
        ),
        # version 0, a string and a bool are no versions
        ({"format": "merit-lab/t", "version": 0}, "version 0 is not one"),
        ({"format": "merit-lab/t", "version": "1"}, "version '1' is not one"),
        ({"format": "merit-lab/t", "version": True}, "version True is not one"),
        ({"format": "merit-lab/t"}, "version None is not one"),
        # no header where none is allowed
        ({"n": 1}, "holds None, not 'merit-lab/t'"),
        # not an object at all
        ([1, 2], "expected a merit-lab/t document"),
    ],
)
def test_unwrap_refuses(doc, match):
    with pytest.raises(EnvelopeError, match=match):
        unwrap(doc, "merit-lab/t", 1, source="runs/x/t.json")
    with pytest.raises(ValueError, match="^runs/x/t.json: "):  # an EnvelopeError is a ValueError
        unwrap(doc, "merit-lab/t", 1, source="runs/x/t.json")


def test_legacy_documents_read_as_version_1_only_when_allowed():
    assert unwrap({"n": 1}, "merit-lab/t", 2, legacy=True) == {"n": 1}
    # legacy allows a missing header, not a wrong one
    with pytest.raises(EnvelopeError, match="holds 'merit-lab/u'"):
        unwrap({"format": "merit-lab/u", "version": 1}, "merit-lab/t", 2, legacy=True)
    with pytest.raises(EnvelopeError, match="version 3"):
        unwrap({"format": "merit-lab/t", "version": 3}, "merit-lab/t", 2, legacy=True)


def test_save_and_load_round_trip_through_a_file(tmp_path):
    path = save_enveloped(tmp_path / "sub" / "t.json", "merit-lab/t", 1, {"rows": [[0.5, -1.0]]})
    assert json.loads(path.read_text()) == {
        "format": "merit-lab/t",
        "version": 1,
        "rows": [[0.5, -1.0]],
    }
    assert load_enveloped(path, "merit-lab/t", 1) == {"rows": [[0.5, -1.0]]}
    path.write_text(json.dumps({"format": "merit-lab/t", "version": 2, "rows": []}))
    with pytest.raises(
        EnvelopeError, match=f"^{re.escape(str(path))}: merit-lab/t version 2 .* upgrade merit-lab"
    ):
        load_enveloped(path, "merit-lab/t", 1)
    path.write_text(json.dumps({"rows": []}))
    assert load_enveloped(path, "merit-lab/t", 1, legacy=True) == {"rows": []}
    with pytest.raises(EnvelopeError, match=f"^{re.escape(str(path))}: this file holds None"):
        load_enveloped(path, "merit-lab/t", 1)
