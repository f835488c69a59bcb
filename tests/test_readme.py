"""The README's two set-up commands are the ones CI runs."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = open(os.path.join(REPO, "README.md")).read()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in _bash_blocks(setup)]
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert "launch/train.py --config=configs/demo.py" in main_job
    assert "pip install -e ." in main_job
    assert 'pip install -e ".[test]"' in tests and "pytest" in tests
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    test_cmd = tests.split("&&", 2)[-1].strip()  # after creating/activating the venv
    assert test_cmd in ci, (test_cmd, ci)
