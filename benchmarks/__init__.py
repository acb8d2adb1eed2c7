"""npyrnn's benchmarks against its peers (d2l chapter 8 in PyTorch), run by ``bench_train.py``.

``common`` holds the timing and pairing code, ``peers`` the implementations being compared
(the torch ones wrap ``tests/reference.py``), ``sections`` one module per measurement and
``report`` the metadata and the table. ``benchmarks/README.md`` says what each number means.
"""
