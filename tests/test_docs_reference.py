"""The reference pages under docs/reference/ are generated from the code (cluster/docgen):
a change to a wire message, a config key or a metric must come with the regenerated page."""
from __future__ import annotations

import subprocess
import sys
import typing

from cluster.docgen import REGENERATE, REPO, pages, stale_pages, write_pages


def test_generated_reference_pages_match_the_code():
    stale = stale_pages()
    assert not stale, f"stale generated pages {stale}: run `{REGENERATE}` and commit them"


def test_every_wire_message_and_config_section_has_its_heading():
    from cluster.docgen.config import sections
    from cluster.wire import messages
    text = pages()["docs/reference/messages.md"]()
    for cls in typing.get_args(messages.Message):
        assert f"\n## {cls.TYPE}\n" in text
    config = pages()["docs/reference/config.md"]()
    for name, _ in sections():
        assert f"\n## [{name}]\n" in config


def test_check_mode_names_the_stale_page_and_the_command_that_regenerates_it(tmp_path):
    assert sorted(write_pages(tmp_path)) == sorted(pages())
    assert stale_pages(tmp_path) == []
    page = tmp_path / "docs/reference/metrics.md"
    page.write_text(page.read_text() + "edited by hand\n")
    run = subprocess.run([sys.executable, "-m", "cluster.docgen", "--check", "--root", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == f"docs/reference/metrics.md is stale: run `{REGENERATE}`"
