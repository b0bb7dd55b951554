"""Named selections: grown over several sessions, validated, kept atomically in the database."""

import json

import pytest

from indexer.errors import UserError
from search_ui.selections import Selections, read_ids_file
from tests.fakes import make_db


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("sel"), n=20)


def test_grow_over_sessions_and_remove(db):
    assert Selections(db).all() == {}
    assert Selections(db).add("hard cases", ["s00003", "s00001"]) == 2
    # A later session (a new object, as after a restart) keeps growing the same set, in order, no duplicates.
    assert Selections(db.path).add("hard cases", ["s00001", "s00007"]) == 3
    assert Selections(db).get("hard cases") == ["s00003", "s00001", "s00007"]
    assert json.loads(db.selections_path.read_text()) == {"hard cases": ["s00003", "s00001", "s00007"]}
    Selections(db).add("other", ["s00002"])
    assert Selections(db).names() == ["hard cases", "other"]
    assert Selections(db).remove("hard cases", ["s00001"]) == 2
    assert Selections(db).get("hard cases") == ["s00003", "s00007"]
    Selections(db).remove("other")
    assert Selections(db).names() == ["hard cases"]


def test_bad_input_leaves_selections_unchanged(db, tmp_path):
    sel = Selections(db)
    before = sel.all()
    with pytest.raises(UserError, match="not in"):
        sel.add("hard cases", ["s00004", "no-such-id"])
    with pytest.raises(UserError, match="name"):
        sel.add("../evil", ["s00004"])
    with pytest.raises(UserError, match="no selection named"):
        sel.get("missing")
    with pytest.raises(UserError, match="no selection named"):
        sel.remove("missing")
    assert sel.all() == before


def test_read_ids_file(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("s1\n\n  s2  \n")
    assert read_ids_file(p) == ["s1", "s2"]
    with pytest.raises(UserError, match="does not exist"):
        read_ids_file(tmp_path / "nope.txt")
