"""Opens a training job's page in headless Chromium and watches its curve.

Usage: watch_job.py URL SCREENSHOT [WAIT_SECONDS]

Prints one JSON line: the number of points on the training-loss curve when
the page first drew it and WAIT_SECONDS later (without a reload), and the
job's state as the page shows it. Saves a screenshot of the page. Needs
selenium (pip) and Debian's chromium and chromium-driver.
"""

import json
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def points(driver):
    # Read in one script: the page redraws its charts every second, and an
    # element found by one call can be replaced before the next reads it.
    return driver.execute_script(
        "const l = document.querySelector('svg#loss polyline.train-loss');"
        "return l ? Number(l.getAttribute('data-points')) : 0;"
    )


def main():
    url, shot = sys.argv[1], sys.argv[2]
    wait = float(sys.argv[3]) if len(sys.argv) > 3 else 4.0
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1100,1000"):
        opts.add_argument(arg)
    # Debian's driver, named so selenium never tries to download one.
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(url)
        WebDriverWait(driver, 20).until(lambda d: points(d) > 0)
        before = points(driver)
        time.sleep(wait)
        after = points(driver)
        state = driver.execute_script(
            "const s = document.getElementById('state');"
            "return s ? s.innerText.trim() : '';"
        )
        driver.save_screenshot(shot)
        print(json.dumps({"before": before, "after": after, "state": state}))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
