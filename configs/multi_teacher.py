"""Multi-teacher distillation from cached teacher predictions. `--config=configs/multi_teacher.py`
(digits: the bundled teacher and two trained from scratch with other seeds and budgets, on CPU):

  # the two teachers (14 and 19 min on 2 CPU cores; EMA 0.998 suits these short budgets)
  python -m jdistill.main --config=configs/teacher.py --workdir=runs/mt_teachers/s1 --config.seed=1 --config.train.num_steps=3000 --config.optim.ema_decay=0.998
  python -m jdistill.main --config=configs/teacher.py --workdir=runs/mt_teachers/s2 --config.seed=2 --config.train.num_steps=2000 --config.optim.ema_decay=0.998
  # the caches, then the student
  python -m jdistill.cache build-latents --config=configs/multi_teacher.py --workdir=runs/mt
  python -m jdistill.cache build-teacher --config=configs/multi_teacher.py --teacher=base --workdir=runs/mt
  (same with --teacher=s1, --teacher=s2)
  python -m jdistill.cache verify --workdir=runs/mt
  python -m jdistill.main --config=configs/multi_teacher.py --workdir=runs/mt

`:finetune` is a teacher config for short fine-tunes of the bundled teacher (the other way to get
several teachers: `--config=configs/multi_teacher.py:finetune --workdir=runs/mt_teachers/ft1
--config.seed=1`); list them in `config.multi_teacher.teachers` and start the student from their
soup (`multi_teacher.student_init='average'`). Other presets (cifar10, imagenet64, ...) need
`config.multi_teacher.teachers` filled in. `:digits_flow` does the same from the bundled
rectified-flow teacher, with s1 and s2 trained by `--config=configs/teacher.py:digits_flow` into
runs/mt_teachers_flow/.
"""
from jdistill.config import base_config
from jdistill.methods import multi_teacher
from jdistill.train.teachers import BUNDLED_DIGITS_TEACHER


def get_config(preset: str = "digits"):
  if preset == "finetune":       # a short fine-tune of the bundled digits teacher (method: teacher)
    config = base_config("digits")
    config.method = "teacher"
    config.teacher.checkpoint = BUNDLED_DIGITS_TEACHER
    # gentle: warm-up and decay (a constant 2e-4 with EMA 0.99 gave teachers 5 FD apart by seed alone)
    config.optim.update(lr=1e-4, warmup_steps=50, schedule="cosine", final_lr_fraction=0.1,
                        ema_decay=0.995)
    config.train.update(num_steps=400, log_every=50, eval_every=0, save_every=200)
    config.eval.update(steps_during_training=(4,), final_steps=(64,))
    return config
  return multi_teacher.get_config(preset)
