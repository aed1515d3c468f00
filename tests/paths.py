"""Where the tests find the repository, their fixtures and helper scripts, from any test folder."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
TESTDATA = os.path.join(TESTS, 'testdata')
TINY_CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
