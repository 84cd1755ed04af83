"""What a newcomer meets: README.md short and in order, docs/ linked, no project history or acceptance verdicts in
what a user reads, benchmark and check scripts under benchmarks/, and every relative link of README and docs/
pointing at a file that exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The non-empty lines outside ``` blocks."""
    out, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.strip():
            out.append(line)
    return out


def test_readme_is_short_and_opens_with_a_picture_and_the_results():
    assert len(prose_lines(README)) <= 250
    head = "\n".join(README.splitlines()[:80])
    assert re.search(r"!\[[^\]]*\]\(\./model_visualisation/\w+\.png\)", head), "no picture in the first 80 lines"
    assert "## Results" in head and re.search(r"^\| what \| measured \|", head, re.M), "no results table early"
    assert "```python\n" in README


def test_readme_sections_come_in_the_order_a_reader_needs_them():
    wanted = ["Quick start", "Results", "Train on your images", "Use a trained model in Python", "The notebook",
              "Generation", "Two levels", "Options", "GPUs and several GPUs", "Where this differs from the paper",
              "Tests", "Layout", "Citation"]
    headings = re.findall(r"^## (.+)$", README, re.M)
    assert [h for h in headings if h in wanted] == wanted


def test_no_history_or_verdicts_where_users_read():
    words = re.compile(r"\bfloors?\b|\blease\b|\bsessions?\b|\bissue \d+", re.I)
    verdicts = re.compile(r"\bPASS(?:ED)?\b|\bFAIL(?:ED)?\b")
    for path in [ROOT / "README.md", *PAGES]:
        text = path.read_text()
        found = words.findall(text) + verdicts.findall(text)
        assert not found, f"{path.name} says {found[:5]}"


def test_docs_pages_exist_and_are_linked_from_the_readme():
    assert PAGES, "docs/ holds no page"
    for page in PAGES:
        assert f"docs/{page.name}" in README, f"README does not link docs/{page.name}"


def test_relative_links_point_at_files_that_exist():
    for path in [ROOT / "README.md", *PAGES]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.name} links {target}, which does not exist"


def test_readme_links_to_benchmarks_sections_that_exist():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", benchmarks, re.M)}
    for anchor in re.findall(r"BENCHMARKS\.md#([\w\-]+)", README):
        assert anchor in anchors, f"README links BENCHMARKS.md#{anchor}, which is no heading there"


def test_the_root_holds_the_workflow_the_library_and_the_brief_only():
    scripts = {p.name for p in ROOT.glob("*.py")}
    stray = {n for n in scripts if re.match(r"(bench|ablation|study|resume_check|gpu_)", n)}
    assert not stray, f"benchmark or check scripts at the root: {sorted(stray)}"
    assert not list(ROOT.glob("*.sh")) and not list(ROOT.glob("study_plan*"))
    for name in ("vqvae.ipynb", "models.py", "data", "model_visualisation", "Pipfile", "Pipfile.lock", "README.md"):
        assert (ROOT / name).exists(), name
    for name in ("bench.py", "bench_data.py", "bench_levels.py", "ablation.py", "study.py", "study_plan.json",
                 "resume_check.py", "gpu_checks.sh", "gpu_levels_screen.py", "gpu_levels_screen.sh",
                 "bench_report.py"):
        assert (ROOT / "benchmarks" / name).exists(), name
