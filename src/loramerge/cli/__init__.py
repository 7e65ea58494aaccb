"""The ``loramerge`` command line and its demo."""
