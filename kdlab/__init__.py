"""kdlab: a knowledge-distillation lab on CIFAR-10 (ResNet50 teacher, ResNet18 students)."""
