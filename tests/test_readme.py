"""The README's quick start runs as written, offline, on the sample data, and shows every stage; and the README
with its pages under docs/ hold together: every page is on the README's map, every relative link leads somewhere."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, limit, read_jsonl

DOCS = ROOT / "docs"
# Pages the README may link before they exist (another change writes them).
PAGES_ON_THEIR_WAY = {"docs/slurm.md"}


def readme_block(name: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", readme, re.DOTALL)
    assert block, f"README.md lost its {name} block"
    return block.group(1)


def quickstart_commands() -> str:
    return readme_block("quickstart")


def test_readme_setup_installs_the_pinned_torch_first_then_the_requirements_that_keep_it():
    """CI (.ci/run) runs this block as written in a fresh clone; here, that its order is the one that works: the
    torch build chosen first, at the version requirements.txt pins (which then leaves it alone)."""
    commands = [line.split("#")[0].strip() for line in readme_block("setup").splitlines() if line.strip()]
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    torch_at = next(i for i, c in enumerate(commands) if c.startswith("pip install torch"))
    requirements_at = next(i for i, c in enumerate(commands) if c == "pip install -r requirements.txt")
    assert commands[torch_at] == f"pip install {pinned}" and torch_at < requirements_at
    assert commands[0].startswith("python3 -m venv .venv")


def test_readme_quickstart_runs_the_whole_pipeline(tmp_path):
    # Same commands, with the model and outputs folders moved into the test's temporary folder.
    commands = quickstart_commands().replace("models/", f"{tmp_path}/models/").replace("outputs/", f"{tmp_path}/o/")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=limit(300))
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "o" / "quickstart"
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["dev_count"] == 61
    assert json.loads((out / "test_results.json").read_text())["test_count"] == 60
    submission = read_jsonl(out / "afqmc_predict.json")
    assert [row["id"] for row in submission] == list(range(60))
    assert len(read_jsonl(out / "predictions.jsonl")) == 60


# --- the README and docs/ as a whole ----------------------------------------------------------------------------

def markdown_files() -> list:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def without_code_blocks(path) -> str:
    """The text of a Markdown file without its fenced code blocks (indented ones in lists included)."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)


def prose(path) -> str:
    """The text of a Markdown file without its code: what is in backticks is never a link."""
    return re.sub(r"`[^`\n]*`", "code", without_code_blocks(path))


def relative_links(path) -> list[tuple[str, str]]:
    """(target path, anchor) of every link and image of `path` that stays in the repository, as written."""
    links = []
    for target in re.findall(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", prose(path)):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        target, _, anchor = target.partition("#")
        links.append((target, anchor))
    return links


def repo_path(path, target: str) -> str:
    """A link target of `path` as a path from the repository root ("docs/x.md"), or the file itself for "#x"."""
    resolved = (path.parent / target).resolve() if target else path.resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)


def anchors(path) -> set[str]:
    """The anchors GitHub gives the headings of `path`: lower case, punctuation (backticks too) dropped, spaces to
    hyphens, and -1, -2, ... after a repeated one."""
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", without_code_blocks(path), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_every_docs_page_is_on_the_readme_map():
    readme = ROOT / "README.md"
    linked = {repo_path(readme, target) for target, _ in relative_links(readme) if target}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file():
    broken = []
    for path in markdown_files():
        for target, _ in relative_links(path):
            where = repo_path(path, target)
            if target and not (ROOT / where).exists() and where not in PAGES_ON_THEIR_WAY:
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_every_link_to_a_section_names_a_heading_of_its_page():
    broken = []
    for path in markdown_files():
        for target, anchor in relative_links(path):
            page = ROOT / repo_path(path, target)
            if anchor and page.suffix == ".md" and page.is_file() and anchor not in anchors(page):
                broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"links to sections that do not exist: {broken}"
