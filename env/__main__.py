from env.build import main

main()
