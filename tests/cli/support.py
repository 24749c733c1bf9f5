"""Assertions shared by the CLI tests."""


def one_line_error(result, *fragments):
    """The command failed with exit 1 and exactly one 'Error:' line holding every fragment."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
