from fedrec.tools.cli import main

main()
