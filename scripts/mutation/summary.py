"""Print mutmut's results per mutated file: run from the staging directory (.mutation/).

Reads mutants/<file>.meta (mutmut's own record of every mutant's exit code) and prints
total / killed / survived / timeout / other per file, the kill rate, and the surviving
mutants' names (``mutmut show NAME`` prints one's diff). With ``--equivalent FILE`` (one
mutant name per line, ``#`` comments allowed), survivors listed there are counted as
equivalent and the kill rate is given over the non-equivalent mutants too. With ``--diffs``,
each such survivor is printed as file:line, the original line and the mutated one.
"""
import argparse
import json
from collections import Counter
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout", -11: "killed", -9: "killed", 37: "killed",
          5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}
# A mutant that crashes the test process (segfault) or is caught by the type checker is
# detected, so it counts as killed; a timeout is reported apart (mutmut treats it as a kill).


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--equivalent", type=Path)
    parser.add_argument("--diffs", action="store_true", help="print each survivor's change")
    args = parser.parse_args()
    equivalent = set()
    if args.equivalent and args.equivalent.exists():
        for line in args.equivalent.read_text().splitlines():
            name = line.split("#", 1)[0].strip()
            if name:
                equivalent.add(name)
    columns = ["total", "not checked", "checked", "killed", "timeout", "survived", "equivalent", "no tests", "other"]
    print(f"{'file':40s}" + "".join(f"{c:>12s}" for c in columns) + f"{'kill rate':>11s}{'non-equiv':>11s}")
    totals: Counter = Counter()
    survivors = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        source = str(meta.relative_to("mutants"))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts: Counter = Counter(total=len(codes))
        for name, code in codes.items():
            status = STATUS.get(code, "other")
            if status == "survived":
                if name in equivalent:
                    status = "equivalent"
                else:
                    survivors.append((name, source))
            counts[status] += 1
        counts["checked"] = counts["total"] - counts["not checked"]
        totals.update(counts)
        print(f"{source:40s}" + "".join(f"{counts[c]:12d}" for c in columns) + rates(counts))
    print(f"{'ALL':40s}" + "".join(f"{totals[c]:12d}" for c in columns) + rates(totals))
    print("\nkill rate: (killed + timeout) / checked; non-equiv: (killed + timeout) / (checked - equivalent)")
    print(f"\nsurviving mutants not marked equivalent ({len(survivors)}):")
    for name, source in survivors:
        print("  " + name)
        if args.diffs:
            for line in describe(name, source):
                print("      " + line)


def describe(name: str, source: str) -> list[str]:
    """file:line of the change, then its removed (-) and added (+) lines."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=source).splitlines()[2:]
    removed = [line[1:] for line in diff if line.startswith("-")]
    added = [line[1:] for line in diff if line.startswith("+")]
    lines = Path(source).read_text().splitlines()
    function = name.rpartition(".")[2].split("__mutmut_")[0]
    function = function.split("ǁ")[-1] if "ǁ" in function else function[2:]  # xǁClassǁname / x_name
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith(f"def {function}(")), 0)
    where = "?"
    if removed:
        at = next((i for i in range(start, len(lines)) if lines[i].strip() == removed[0].strip()), None)
        where = str(at + 1) if at is not None else "?"
    shown = source.replace("src/rmt_runtime/", "runtime/").replace("src/rmt_export/", "export/")
    return [f"{shown}:{where}"] + [f"- {line.strip()}" for line in removed] + [f"+ {line.strip()}" for line in added]


def rates(c: Counter) -> str:
    detected = c["killed"] + c["timeout"]
    overall = detected / c["checked"] if c["checked"] else 0.0
    rest = c["checked"] - c["equivalent"]
    non_equivalent = detected / rest if rest else 1.0
    return f"{overall:11.1%}{non_equivalent:11.1%}"


if __name__ == "__main__":
    main()
