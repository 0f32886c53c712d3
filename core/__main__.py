from dagc.cli import main

main()
