from dagc.tools.cli import main

main()
