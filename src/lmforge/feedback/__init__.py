"""Human feedback: a web app to judge sampled responses, its SQLite store, and the export of
judgments as reward-model training pairs. Run `python -m lmforge.feedback --help`.

Importing the package needs neither FastAPI nor torch: `store`, `stats` and `export` use the
standard library only; `app` (FastAPI) and the model are imported by `serve`.
"""
