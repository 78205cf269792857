"""
RESULTS.md's rule: every section with measured numbers names the machine, the dtype and the
commit they come from, in a line "Measured: MACHINE, DTYPE, commit C" (or "commits C1 to C2"),
with MACHINE one of RESULTS.md's "Machines" table. This test checks that the line is there and
that each commit it names exists in this repository's history (skipped outside a git clone).
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# sections that hold no measurement: the table of machines, prose about the tests
# and the failure modes (their numbers are settings, not measurements)
NO_NUMBERS = {"Results", "Machines",
              "What happens when things fail, in detail", "Speed"}


def sections(text):
    """(heading, body) for every '#', '##' and '###' heading outside code blocks."""
    out, heading, body, fenced = [], None, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,3} (.+)", line)
        if m:
            if heading is not None:
                out.append((heading, "\n".join(body)))
            heading, body = m.group(1).strip(), []
        else:
            body.append(line)
    if heading is not None:
        out.append((heading, "\n".join(body)))
    return out


def machines(text):
    """The names of RESULTS.md's Machines table (its bold first column)."""
    start = text.index("## Machines")
    table = text[start:text.index("\n## ", start)]
    return set(re.findall(r"^\| \*\*(\w+)\*\* \|", table, flags=re.M))


def measured_lines(body):
    return re.findall(r"^Measured: (.+)$", body, flags=re.M)


def test_every_results_section_names_machine_dtype_and_commit():
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    names = machines(text)
    assert {"Xeon", "EPYC"} <= names, names
    missing, bad = [], []
    for heading, body in sections(text):
        if heading in NO_NUMBERS:
            continue
        lines = measured_lines(body)
        if not lines:
            missing.append(heading)
            continue
        for line in lines:
            if not any(line.startswith(n) for n in names):
                bad.append(f"{heading}: machine not in the Machines table: {line[:60]!r}")
            if not re.search(r"\b(fp32|bf16)\b", line):
                bad.append(f"{heading}: no dtype: {line[:60]!r}")
            if not re.search(r"\bcommits? [0-9a-f]{7}", line):
                bad.append(f"{heading}: no commit: {line[:60]!r}")
    assert not missing, f"RESULTS.md sections without a 'Measured: MACHINE, DTYPE, commit C' line: {missing}"
    assert not bad, bad


def test_the_named_commits_exist():
    # .git is a folder in a clone, a file in a worktree
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git clone")
    text = open(os.path.join(ROOT, "RESULTS.md")).read()
    hashes = set()
    for _, body in sections(text):
        for line in measured_lines(body):
            hashes.update(re.findall(r"\b[0-9a-f]{7}\b", line))
    assert hashes
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip() == "true"
    unknown = [h for h in sorted(hashes) if subprocess.run(["git", "cat-file", "-e", f"{h}^{{commit}}"], cwd=ROOT,
                                                           capture_output=True).returncode != 0]
    if unknown and shallow:
        pytest.skip(f"shallow clone: {unknown} not fetched")
    assert not unknown, f"RESULTS.md names commits this repository does not have: {unknown}"
