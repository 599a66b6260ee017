"""The test suite, a package so that tests import shared helpers as `tests.conftest` and
`tests.fsdp_checks` (pytest.ini puts the repository root on the import path)."""
