"""The project's own study of LoPT against its baselines (study v2, ``make experiment``).

``plan`` says what runs (budget, configurations, commands), ``run`` runs it in resumable pieces,
``records`` keeps one JSON record per finished piece, ``report`` writes records/study-v2/RESULTS.md,
its plots and the README's cost table from the records; ``lower_alone`` replays LoPT's lower half on
its local loss alone. Study v1 (20 steps) is kept only as frozen records in records/study-v1/.
"""
