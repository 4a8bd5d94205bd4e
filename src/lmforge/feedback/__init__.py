"""Human feedback: a web app to judge sampled responses (app.py), annotator agreement and win
rates (agreement.py), and its command line `python -m lmforge.feedback serve|export|stats`.

The database the app writes and the rules that turn judgments into reward-model pairs are a data
source like any other, so they live in the data layer: `lmforge.data.feedback_store` and
`lmforge.data.feedback_export` (what `data=feedback` and `python -m lmforge.feedback export` read).
Importing the package needs neither FastAPI nor torch: `app` (FastAPI) and the model are imported
by `serve`.
"""
