from ckpt_doctor.cli import main

main()
