"""Comparing post-training methods: ``lopt study`` on any model and data (the project's own study v3 is
``make experiment``: :mod:`lopt.recipes.experiment`), and study v2's frozen code.

``lopt study`` (:mod:`~lopt.recipes.study.command`): its options, plan, resumable pieces and estimates;
:mod:`~lopt.recipes.study.summary` writes its report and a README's block of it from the records;
:mod:`~lopt.recipes.study.matched` reads retention at matched task skill off each method's curve;
:mod:`~lopt.recipes.study.rules` derives "which method when" from the numbers.

Study v2 (``python -m lopt.recipes.study.v2``, kept to reproduce records/study-v2/): ``plan`` says what
runs (budget, configurations, commands), ``run`` runs it in resumable pieces, ``report`` writes
records/study-v2/RESULTS.md, its plots and the README's study-v2 cost table from the records;
``lower_alone`` replays LoPT's lower half on its local loss alone. Both keep one JSON record per
finished piece (:mod:`~lopt.recipes.study.records`). Study v1 (20 steps) is kept only as frozen records
in records/study-v1/.
"""
