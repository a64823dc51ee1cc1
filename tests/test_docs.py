"""The docs are self-contained: no pointers outside the repository, no broken links."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# `../shared` is a folder beside the development checkout; a clone has no such folder.
OUTSIDE = "../" + "shared"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git or the .git folder is not available")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"git ls-files failed: {out.stderr.decode(errors='replace').strip()}")
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_outside_tests_points_at_shared():
    offenders = []
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" or not path.is_file():
            continue
        if OUTSIDE.encode() in path.read_bytes():
            offenders.append(str(rel))
    assert not offenders, f"files pointing at {OUTSIDE!r}: {offenders}"


def relative_links(md: Path) -> list[str]:
    """Link targets in a markdown file that are paths in this repository."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # skip code blocks
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue  # URL, mailto:, in-page anchor or absolute path
        targets.append(target.split("#", 1)[0])
    return targets


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_markdown_links_point_at_files(md):
    missing = [t for t in relative_links(md) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(ROOT)}: links to missing files: {missing}"


def test_link_finder_sees_relative_links():
    readme_links = relative_links(ROOT / "README.md")
    assert "docs/shapes-dataset.md" in readme_links
    assert "docs/cli.md" in readme_links
    assert "docs/openai-api.md" in readme_links


def test_the_documented_vocabulary_is_the_models():
    from stepserve.models.builtin.captions import vocabulary

    text = (ROOT / "docs" / "shapes-dataset.md").read_text()
    listed = text[text.index("## Vocabulary"):].split("\n\n")[1]
    assert re.findall(r"`([a-z]+)`", listed) == list(vocabulary())
