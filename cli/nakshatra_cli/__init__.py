"""The ``nak`` command line of Nakshatra (see :mod:`nakshatra_cli.main`)."""
