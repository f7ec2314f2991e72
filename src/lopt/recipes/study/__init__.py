"""Comparing post-training methods: ``lopt study`` on any model and data, and the project's own study v2.

``lopt study`` (:mod:`~lopt.recipes.study.command`): its options, plan, resumable pieces and estimates;
:mod:`~lopt.recipes.study.summary` writes its report from the records; :mod:`~lopt.recipes.study.matched`
reads retention at matched task skill off each method's curve; :mod:`~lopt.recipes.study.rules` derives
"which method when" from the numbers.

Study v2 (``make experiment``): ``plan`` says what runs (budget, configurations, commands), ``run`` runs
it in resumable pieces, ``report`` writes records/study-v2/RESULTS.md, its plots and the README's cost
table from the records; ``lower_alone`` replays LoPT's lower half on its local loss alone. Both keep one
JSON record per finished piece (:mod:`~lopt.recipes.study.records`). Study v1 (20 steps) is kept only as
frozen records in records/study-v1/.
"""
