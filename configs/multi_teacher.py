"""Multi-teacher distillation from cached teacher predictions. `--config=configs/multi_teacher.py`
(digits: the bundled teacher and two fine-tunes of it, equal weights, all on CPU):

  # the two fine-tunes (`:finetune` is a teacher config starting from the bundled teacher)
  python -m jdistill.main --config=configs/multi_teacher.py:finetune --workdir=runs/mt_teachers/ft1 --config.seed=1
  python -m jdistill.main --config=configs/multi_teacher.py:finetune --workdir=runs/mt_teachers/ft2 --config.seed=2
  # the caches, then the student
  python -m jdistill.cache build-latents --config=configs/multi_teacher.py --workdir=runs/mt
  python -m jdistill.cache build-teacher --config=configs/multi_teacher.py --teacher=base --workdir=runs/mt
  (same with --teacher=ft1, --teacher=ft2)
  python -m jdistill.cache verify --workdir=runs/mt
  python -m jdistill.main --config=configs/multi_teacher.py --workdir=runs/mt

Other presets (cifar10, imagenet64, ...) need `config.multi_teacher.teachers` filled in.
"""
from jdistill.config import BUNDLED_DIGITS_TEACHER, base_config, multi_teacher_config


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
  return multi_teacher_config(preset)
