"""The test suite is a package, so tools that map files to modules (mypy) name tests/support as tests.support only."""
