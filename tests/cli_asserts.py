"""Shared assertion for CLI tests: a user error is one `error:` line on stderr and exit code 1."""


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output
