from tunerag.cli import main

main()
