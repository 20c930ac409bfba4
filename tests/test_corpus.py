"""The offline corpus: reST cleaning, the R reader, whole novels held out."""

from __future__ import annotations

import shutil

import pytest

from cbd_mlx.corpus import clean_rst, fetch


def test_clean_rst_unwraps_markup():
    src = """Title
=====

.. index:: single: foo

See :func:`os.path.join` and ``x = 1`` or `the docs <https://x.org>`_, *really*.

.. code-block:: python

   print("dropped")

.. note::

   Notes stay.
"""
    out = clean_rst(src)
    assert "See os.path.join and x = 1 or the docs, really." in out
    assert "=====" not in out and "index::" not in out and "dropped" not in out
    assert "Notes stay." in out


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian-based system")
def test_fetch_austen_holds_out_a_whole_novel(tmp_path):
    out = fetch(tmp_path / "corpus", ("austen",))
    train = sorted(p.stem for p in (out / "train" / "austen").iterdir())
    held = sorted(p.stem for p in (out / "heldout" / "austen").iterdir())
    assert held == ["persuasion"]
    assert train == ["emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"]
    text = (out / "heldout" / "austen" / "persuasion.txt").read_text()
    assert "Sir Walter Elliot" in text and len(text) > 400_000


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian-based system")
def test_fetch_bible_and_speeches_are_clean_prose(tmp_path):
    out = fetch(tmp_path / "corpus", ("bible", "sotu"))
    bible = {p.stem: p.read_text() for p in (out / "train" / "bible").iterdir()}
    assert len(bible) > 500 and sum(map(len, bible.values())) > 3_000_000
    gen = bible["ot-Gen-000"]
    assert gen.startswith("In the beginning, God created the heavens and the earth.")
    assert not any("<" in t or "strong:" in t for t in bible.values())  # markup and notes gone
    sotu = " ".join(p.read_text() for p in (out / "train" / "sotu").iterdir())
    assert "Members of Congress" in sotu and len(sotu) > 50_000
    assert list((out / "heldout").rglob("*.txt")), "whole documents are held out too"


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs a Debian-based system")
def test_the_out_of_domain_suite_shares_nothing_with_the_corpus(tmp_path):
    from cbd_mlx.corpus import SUITE, SUITE_MIN_CHARS, fetch_suite

    out = fetch_suite(tmp_path / "suite")
    texts = {name: (out / f"{name}.txt").read_text() for name in SUITE}
    assert all(len(t) >= SUITE_MIN_CHARS for t in texts.values())
    assert "Queequeg" in texts["melville"] and "Project Gutenberg" not in texts["melville"]
    assert "<BODY>" not in texts["news"] and "dlrs" in texts["news"]
    assert "austen" not in texts["quotes"].lower()
    assert "Never distill on them" in (out / "README.txt").read_text()
