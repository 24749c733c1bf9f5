"""Prints, after the run, how many documented code blocks ran and which were skipped, why."""


def pytest_terminal_summary(terminalreporter):
    run, skipped, timed = 0, [], []
    for report in [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]:
        if report.when != "call":
            continue
        for name, outcomes in report.user_properties:
            if name != "doc_blocks":
                continue
            document = report.nodeid.rsplit("[", 1)[-1].rstrip("]")
            for line, status, reason, seconds in outcomes:
                if status == "run":
                    run += 1
                    timed.append((seconds, f"{document}:{line}"))
                else:
                    skipped.append(f"{document}:{line}: {reason}")
    if run or skipped:
        terminalreporter.section("documented code blocks")
        terminalreporter.write_line(f"{run} run, {len(skipped)} skipped")
        slowest = ", ".join(f"{where} {seconds:.0f}s" for seconds, where in sorted(timed, reverse=True)[:3])
        terminalreporter.write_line(f"  slowest run: {slowest}")
        for line in skipped:
            terminalreporter.write_line(f"  skipped {line}")
