"""The embedded synthetic world: lmforge's default data, with a ground-truth judge.

* :mod:`lmforge.world.tasks`: the task kinds, their prompts and answers, the operand ranges of
  the world and of its harder split, the dialog template, parsing a prompt back into its task;
* :mod:`lmforge.world.splits`: the split of every prompt (train, val, test, hard): held-out
  prompts are new combinations of what training shows, and ``hard`` has longer numbers;
* :mod:`lmforge.world.generator`: :class:`~lmforge.world.generator.SyntheticWorld`, which samples
  tasks, pretraining documents, SFT pairs, RL prompts and preference pairs (simulated annotator);
* :mod:`lmforge.world.corruptions`: the wrong and low-quality answers human feedback fixes;
* :mod:`lmforge.world.judge`: the ground-truth judge and the reward callable
  ``lmforge.world.judge.ground_truth_reward``.
"""
