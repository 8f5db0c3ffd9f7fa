from fedrec.tools.cli import main

if __name__ == "__main__":          # not when a `fedrec serve --workers` process imports it
    main()
